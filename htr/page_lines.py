"""Cut the text lines of PAGE-XML / ALTO pages into the shared line-data format: find each page's image, cut its
lines along their polygons (with the baseline-band / bounding-box fallbacks), write the line images, gt.txt, the
per-page records and the summary. prepare_pages.py is the command (its docstring describes the rules); transcribe
(htr/transcription.py) and the web demo (htr/web_app.py) cut lines with the same LineCutter. Reading the XML is
htr/pagexml.py's.
"""
import json
import os
import random
import re
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from htr.corpus_licence import corpus_licence, describe
from htr.pagexml import Line, Page, PageXmlError, read_page
from utils import UserError, normalize_text

SPLITS = ("train", "val", "test")
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".tif", ".tiff"}
BAND_UP, BAND_DOWN = 0.8, 0.4     # baseline band fallback, in line spacings above / below the baseline
THIN = 0.35                       # a polygon with a mean height below THIN line spacings and half the page's
                                  # typical line height, and over 4 times as long as high, is a thin strip
GAP_MAX = 3                       # baseline gaps over GAP_MAX typical line heights are not line spacings
DILATE = 0.1                      # polygon dilation, in line spacings (at least 2 px)
ON_BASELINE = 0.1                 # a baseline point this many line spacings outside its polygon is off it
RARE = 5                          # characters seen fewer times than this are listed as rare
VERSION = 1                       # of the cutting; part of the settings that decide whether a page is redone


@dataclass
class Job:
    uid: str                      # page id used in output names: the XML stem, sanitised and unique
    xml: Path
    split: str


# ------------------------------------------------------------------------------------------------------- images

class ImageFinder:
    """Finds a page's image among the image files under some folders (see the module docstring for the order)."""

    def __init__(self, roots: list[Path], max_depth: int | None):
        self.by_stem: dict[str, list[Path]] = {}
        for root in roots:
            found = root.rglob("*") if max_depth is None else (
                p for depth in range(1, max_depth + 1) for p in root.glob("/".join(["*"] * depth)))
            for path in sorted(found):
                if path.suffix.lower() in IMAGE_EXTS and not hidden(path, root):
                    self.by_stem.setdefault(path.stem.lower(), []).append(path)

    @staticmethod
    def _closest(paths: list[Path], xml: Path) -> Path:
        return max(paths, key=lambda p: len(os.path.commonpath([p.parent, xml.parent]).split(os.sep)))

    def find(self, xml: Path, named: str | None) -> tuple[Path | None, str]:
        """-> (image path or None, how it was found)."""
        written = Path(named.replace("\\", "/")) if named else None
        if written and (xml.parent / written).is_file():
            return xml.parent / written, "named"
        name = written.name if written else ""
        if name and (xml.parent / name).is_file():
            return xml.parent / name, "named"
        for stem, how in ((Path(name).stem, "named, other extension"), (xml.stem, "XML file name")):
            paths = self.by_stem.get(stem.lower(), []) if stem else []
            exact = [p for p in paths if p.name.lower() == name.lower()]
            if paths:
                return self._closest(exact or paths, xml), "named" if exact else how
        for stem in dict.fromkeys(s.lower() for s in (Path(name).stem, xml.stem) if s):
            paths = [p for s, ps in self.by_stem.items() if _affixed(s, stem) for p in ps]
            if len(paths) == 1:
                return paths[0], "name with a prefix or suffix"
        return None, "missing"


def hidden(path: Path, root: Path) -> bool:
    """Whether `path` (under `root`) is hidden or inside a hidden folder."""
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _affixed(a: str, b: str) -> bool:
    """True if a and b differ by a prefix or suffix that joins at a separator: imp_x / x, x (1) / x."""
    long, short = (a, b) if len(a) > len(b) else (b, a)
    return long != short and any(long.endswith(sep + short) or long.startswith(short + sep) for sep in "_- ")


def image_roots(xml_dir: Path, images: Path | None) -> tuple[list[Path], int | None]:
    if images is not None:
        return [images], None
    if any(p.suffix.lower() in IMAGE_EXTS for p in xml_dir.rglob("*")):
        return [xml_dir], None
    return [xml_dir.parent], 2


# ---------------------------------------------------------------------------------------------------- geometry

def line_metrics(lines: list[Line], fallback: float) -> tuple[float, float]:
    """-> (line spacing, typical line height) of a page in pixels. The spacing is the median distance from each
    baseline to the nearest one below it that overlaps it horizontally, leaving out gaps over GAP_MAX typical
    heights (between blocks, e.g. to a page number); the typical height is the 90th percentile of the polygons'
    mean heights (a minority of thin or broken polygons does not lower it)."""
    heights = [extent(ln.polygon)[0] for ln in lines if ln.polygon is not None and len(ln.polygon) >= 3]
    typical = float(np.percentile(heights, 90)) if heights else fallback
    bases = [(b[:, 0].min(), b[:, 0].max(), float(np.median(b[:, 1])))
             for b in (ln.baseline for ln in lines) if b is not None and len(b) >= 2]
    gaps = []
    for x0, x1, y in bases:
        below = [y2 - y for u0, u1, y2 in bases if y2 > y and min(x1, u1) > max(x0, u0)]
        if below and min(below) <= GAP_MAX * typical:
            gaps.append(min(below))
    return (float(np.median(gaps)) if gaps else typical), typical


def extent(polygon: np.ndarray) -> tuple[float, float]:
    """-> (mean height, length) of a (slanted) line polygon: the long side of its minimal rotated rectangle, and
    the polygon's area over it."""
    (_, _), (w, h), _ = cv2.minAreaRect(polygon.astype(np.float32))
    length = max(w, h, 1.0)
    return cv2.contourArea(polygon.astype(np.float32)) / length, length


def resample(polyline: np.ndarray, n: int = 16) -> np.ndarray:
    """(k, 2) polyline -> (n, 2) points evenly spaced along it."""
    steps = np.r_[0, np.cumsum(np.hypot(*np.diff(polyline, axis=0).T))]
    at = np.linspace(0, steps[-1], n)
    return np.stack([np.interp(at, steps, polyline[:, 0]), np.interp(at, steps, polyline[:, 1])], axis=1)


class LineCutter:
    """Cuts the lines of one page image (h, w) uint8 grey; spacing and typical line height in pixels."""

    def __init__(self, image: np.ndarray, spacing: float, typical: float):
        self.image, self.spacing, self.typical = image, spacing, typical
        self.pad = max(2, round(DILATE * spacing))

    @classmethod
    def of_page(cls, image: np.ndarray, lines: list[Line]) -> "LineCutter":
        """A cutter with the line spacing and typical height of the page's lines (in image pixels)."""
        return cls(image, *line_metrics(lines, fallback=image.shape[0] / 30))

    def _on_page(self, points: np.ndarray) -> bool:
        h, w = self.image.shape
        tol = 0.02 * max(h, w)
        return bool((points.min(0) >= -tol).all() and (points.max(0) <= (w + tol, h + tol)).all())

    def _polygon_problem(self, line: Line) -> str | None:
        polygon, baseline = line.polygon, line.baseline
        if polygon is None:
            return "no polygon"
        if len(polygon) < 3:
            return "fewer than 3 points"
        if not self._on_page(polygon):
            return "off the page"
        if baseline is not None and len(baseline) >= 2:
            contour = polygon.astype(np.float32).reshape(-1, 1, 2)
            inside = [cv2.pointPolygonTest(contour, (float(x), float(y)), True) >= -ON_BASELINE * self.spacing
                      for x, y in resample(baseline)]
            if np.mean(inside) < 0.5:
                return "off its baseline"
        height, length = extent(polygon)
        if height < min(THIN * self.spacing, 0.5 * self.typical) and length > 4 * height:
            return "thin"
        return None

    def outline(self, line: Line) -> tuple[np.ndarray | None, str | None]:
        """-> ((n, 2) outline in image pixels or None if the line has no usable geometry, fallback used or None)."""
        problem = self._polygon_problem(line)
        if problem is None:
            return line.polygon, None
        baseline = line.baseline
        if baseline is not None and len(baseline) >= 2 and self._on_page(baseline):
            top = resample(baseline) - (0, BAND_UP * self.spacing)
            bottom = resample(baseline)[::-1] + (0, BAND_DOWN * self.spacing)
            return np.concatenate([top, bottom]), f"baseline band ({problem})"
        parts = [p for p in (line.polygon, baseline) if p is not None]
        if line.box is not None:
            parts.append(np.array(line.box).reshape(2, 2))
        if not parts:
            return None, None
        h, w = self.image.shape
        points = np.clip(np.concatenate(parts), 0, (w, h))
        (x0, y0), (x1, y1) = points.min(0), points.max(0)
        if x1 - x0 < 2 or y1 - y0 < 2:
            return None, None
        return np.array([(x0, y0), (x1, y0), (x1, y1), (x0, y1)]), f"bounding box ({problem})"

    def crop(self, line: Line) -> tuple[np.ndarray | None, str | None]:
        """-> (the line's image (h, w) uint8, or None without usable geometry; fallback used or None)."""
        outline, fallback = self.outline(line)
        return (None if outline is None else self.cut(outline)), fallback

    def cut(self, outline: np.ndarray) -> np.ndarray | None:
        """Paint everything outside the dilated outline paper grey and crop to its box -> (h, w) uint8."""
        h, w = self.image.shape
        x0, y0 = np.maximum(np.floor(outline.min(0)).astype(int) - self.pad, 0)
        x1, y1 = np.minimum(np.ceil(outline.max(0)).astype(int) + self.pad + 1, (w, h))
        if x1 - x0 < 2 or y1 - y0 < 2:
            return None
        crop = self.image[y0:y1, x0:x1]
        mask = np.zeros(crop.shape, np.uint8)
        cv2.fillPoly(mask, [np.round(outline - (x0, y0)).astype(np.int32)], 255)
        mask = cv2.dilate(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * self.pad + 1,) * 2))
        paper = np.percentile(crop[mask > 0], 90) if mask.any() else 255
        return np.where(mask > 0, crop, np.uint8(paper))


# ------------------------------------------------------------------------------------------------------- pages

class PageProblem(Exception):
    """Why a page is left out; `kind` heads its group in the summary, the message names the file."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def find_image(page: Page, finder: ImageFinder) -> tuple[Path, str]:
    """-> (the page's image, how it was found); PageProblem if there is none."""
    path, how = finder.find(page.path, page.image_name)
    if path is None:
        raise PageProblem("no image", f"{page.path}: no image found (the XML names {page.image_name!r})")
    return path, how


def load_image(page: Page, path: Path) -> tuple[np.ndarray, list[Line]]:
    """-> (grey page image (h, w) uint8, the page's lines in its pixel coordinates)."""
    image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise PageProblem("unreadable image", f"{path}: unreadable image")
    if page.size is None:
        return image, page.lines
    h, w = image.shape
    s = np.array([w / page.size[0], h / page.size[1]])
    if abs(s[0] / s[1] - 1) > 0.02:
        raise PageProblem("image size mismatch", f"{page.path}: image {path.name} is {w}x{h}, the XML's page "
                                                 f"{page.size[0]:g}x{page.size[1]:g}")
    return image, [scaled(ln, s) for ln in page.lines]


def scaled(line: Line, s: np.ndarray) -> Line:
    box = None if line.box is None else tuple(np.array(line.box) * np.tile(s, 2))
    return Line(line.id, line.text, None if line.polygon is None else line.polygon * s,
                None if line.baseline is None else line.baseline * s, box, line.types, line.element)


def clean_text(text: str) -> str:
    return normalize_text(" ".join(text.split()))


def cut_lines(job: Job, image: np.ndarray, lines: list[Line], out_dir: Path, line_types: frozenset,
              scale: float) -> tuple[list, dict]:
    """Write the wanted lines' images -> ([[line id, text, XML line id, fallback or None]], {skip reason: count})."""
    cutter = LineCutter.of_page(image, lines)
    written, skipped = [], Counter()
    for n, line in enumerate(lines, 1):
        text = clean_text(line.text)
        if line_types and not line.types & line_types:
            skipped["filtered by line type"] += 1
            continue
        if not text:
            skipped["empty text"] += 1
            continue
        crop, fallback = cutter.crop(line)
        if crop is None:
            skipped["no usable geometry"] += 1
            continue
        if scale != 1.0:
            size = (max(round(crop.shape[1] * scale), 1), max(round(crop.shape[0] * scale), 1))
            crop = cv2.resize(crop, size, interpolation=cv2.INTER_AREA)
        line_id = f"{job.uid}_{n:03d}"
        cv2.imwrite(str(out_dir / job.split / f"{line_id}.png"), crop)
        written.append([line_id, text, line.id, fallback])
    return written, dict(skipped)


def reusable(old: dict | None, settings: dict, out_dir: Path) -> bool:
    return bool(old) and old["settings"] == settings and all(
        (out_dir / old["split"] / f"{line_id}.png").is_file() for line_id, *_ in old["lines"])


def process_page(job: Job, out_dir: Path, finder: ImageFinder, line_types: frozenset, scale: float) -> dict:
    """Cut and write the lines of one page, or reuse a finished run of it -> what was written, skipped, wrong."""
    result = {"page": job.uid, "xml": str(job.xml), "split": job.split, "lines": [], "skipped": {}, "image": None,
              "image_found_by": None, "problem": None, "problem_kind": None}
    sidecar = out_dir / "pages" / f"{job.uid}.json"
    try:
        page = read_page(job.xml)
        image_path, how = find_image(page, finder)
        stat = job.xml.stat()
        settings = {"version": VERSION, "xml": [str(job.xml), stat.st_mtime_ns, stat.st_size],
                    "image": str(image_path), "split": job.split, "line_types": sorted(line_types), "scale": scale}
        old = json.loads(sidecar.read_text(encoding="utf-8")) if sidecar.is_file() else None
        if reusable(old, settings, out_dir):
            return old
        for line_id, *_ in (old or {}).get("lines", []):
            (out_dir / old["split"] / f"{line_id}.png").unlink(missing_ok=True)
        image, lines = load_image(page, image_path)
    except (PageXmlError, PageProblem) as e:
        return result | {"problem": str(e), "problem_kind": e.kind}
    result |= {"image": str(image_path), "image_found_by": how, "settings": settings}
    result["lines"], result["skipped"] = cut_lines(job, image, lines, out_dir, line_types, scale)
    tmp = sidecar.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, ensure_ascii=False, indent=1), encoding="utf-8")
    tmp.replace(sidecar)
    return result


# ---------------------------------------------------------------------------------------------------- splits

def page_ids(xmls: list[Path]) -> dict[Path, str]:
    """XML path -> unique output page id: the stem with odd characters as `_`, numbered on a clash."""
    ids, seen = {}, Counter()
    for xml in xmls:
        base = re.sub(r"[^A-Za-z0-9.-]+", "_", xml.stem).strip("_") or "page"
        seen[base] += 1
        ids[xml] = base if seen[base] == 1 else f"{base}_{seen[base]}"
    return ids


def read_split_lists(splits_dir: Path) -> dict[str, str]:
    """DIR/{train,val,test}.txt (page ids, one per line) -> {page id: split}."""
    missing = [f"{s}.txt" for s in SPLITS if not (splits_dir / f"{s}.txt").is_file()]
    if missing:
        raise UserError(f"--splits {splits_dir} lacks {', '.join(missing)} (one page id per line each)")
    assigned = {}
    for split in SPLITS:
        for row in (splits_dir / f"{split}.txt").read_text(encoding="utf-8").splitlines():
            page = row.strip().removesuffix(".xml")
            if page and assigned.setdefault(page, split) != split:
                raise UserError(f"page {page!r} is listed in both {assigned[page]}.txt and {split}.txt")
    return assigned


def seeded_split(stems: list[str], val: float, test: float, seed: int) -> dict[str, str]:
    order = sorted(stems)
    random.Random(seed).shuffle(order)
    n_test, n_val = (max(1, round(f * len(order))) if f > 0 and len(order) >= 3 else 0 for f in (test, val))
    return {stem: "test" if k < n_test else "val" if k < n_test + n_val else "train" for k, stem in enumerate(order)}


# --------------------------------------------------------------------------------------------------- summary

def summarize(results: list[dict], unlisted: list[str], not_found: list[str], licence: dict) -> dict:
    ok = [r for r in results if r["problem"] is None]
    chars = Counter(c for r in ok for _, text, *_ in r["lines"] for c in text)
    train_chars = {c for r in ok if r["split"] == "train" for _, text, *_ in r["lines"] for c in text}
    skipped_pages = {}
    for r in sorted(results, key=lambda r: r["xml"]):
        if r["problem"]:
            skipped_pages.setdefault(r["problem_kind"], []).append(r["problem"])
    if unlisted:
        skipped_pages["in no split list"] = unlisted
    return {
        "pages": {s: sum(r["split"] == s for r in ok) for s in SPLITS},
        "lines": {s: sum(len(r["lines"]) for r in ok if r["split"] == s) for s in SPLITS},
        "characters": {s: sum(len(t) for r in ok if r["split"] == s for _, t, *_ in r["lines"]) for s in SPLITS},
        "charset": "".join(sorted(chars)),
        "rare_characters": {c: n for c, n in sorted(chars.items()) if n < RARE},
        "not_in_train": "".join(sorted(set(chars) - train_chars)),
        "fallbacks": dict(sorted(Counter(ln[3] for r in ok for ln in r["lines"] if ln[3]).items())),
        "images_found_by": dict(sorted(Counter(r["image_found_by"] for r in ok if r["image_found_by"] != "named")
                                       .items())),
        "skipped_lines": dict(sorted(sum((Counter(r["skipped"]) for r in ok), Counter()).items())),
        "skipped_pages": skipped_pages,
        "listed_but_not_found": not_found,
        "licence": licence,
    }


def format_summary(s: dict) -> str:
    out = [f"{split:5s}: {s['pages'][split]} pages, {s['lines'][split]} lines, {s['characters'][split]} characters"
           for split in SPLITS]
    out.append(f"charset ({len(s['charset'])}): {s['charset']}")
    out.append(f"rare (< {RARE}): " + " ".join(f"{c!r}:{n}" for c, n in s["rare_characters"].items()))
    out.append(f"in val/test, not in train: {s['not_in_train']!r}")
    for key, title in (("fallbacks", "fallbacks"), ("images_found_by", "images found by"),
                       ("skipped_lines", "skipped lines")):
        out.append(f"{title}:" + "".join(f"\n  {k}: {n}" for k, n in s[key].items()) if s[key] else f"{title}: none")
    for kind, items in s["skipped_pages"].items():
        out.append(f"skipped pages, {kind} ({len(items)}):" + "".join(f"\n  {i}" for i in items))
    if s["listed_but_not_found"]:
        out.append(f"listed but no XML ({len(s['listed_but_not_found'])}): {', '.join(s['listed_but_not_found'])}")
    out.append(f"licence: {describe(s['licence'])}")
    return "\n".join(out)


def write_gt(split_dir: Path, results: list[dict]) -> None:
    rows = [f"{i} {t}\n" for r in sorted(results, key=lambda r: r["page"]) for i, t, *_ in r["lines"]]
    tmp = split_dir / "gt.txt.tmp"
    tmp.write_text("".join(rows), encoding="utf-8")
    tmp.replace(split_dir / "gt.txt")


# ------------------------------------------------------------------------------------------------------- run

def check_args(args) -> list[Path]:
    """-> the XML files under XML_DIR (absolute, sorted); UserError for unusable arguments."""
    folders = ((args.xml_dir, "XML folder"), (args.images, "--images folder"), (args.splits, "--splits folder"))
    for path, what in folders:
        if path is not None and not path.is_dir():
            raise UserError(f"{what} not found: {path}")
    if not (args.val_fraction >= 0 and args.test_fraction >= 0 and args.val_fraction + args.test_fraction < 1):
        raise UserError("--val-fraction and --test-fraction must be >= 0 and sum to less than 1")
    if args.scale <= 0:
        raise UserError("--scale must be > 0")
    xml_dir = args.xml_dir.resolve()
    xmls = sorted(p for p in xml_dir.rglob("*.xml") if not hidden(p, xml_dir))
    if not xmls:
        raise UserError(f"no *.xml files under {args.xml_dir}")
    return xmls


def prepare(args) -> None:
    """prepare_pages.py's run on its parsed command line: cut every page, write gt.txt and summary.json, print the
    summary."""
    xmls = check_args(args)
    if args.splits is not None:
        assigned = read_split_lists(args.splits)
    else:
        assigned = seeded_split([x.stem for x in xmls], args.val_fraction, args.test_fraction, args.seed)
    uids = page_ids(xmls)
    jobs = [Job(uids[x], x, assigned[x.stem]) for x in xmls if x.stem in assigned]
    unlisted = [str(x) for x in xmls if x.stem not in assigned]
    not_found = sorted(set(assigned) - {x.stem for x in xmls})
    for d in (*SPLITS, "pages"):
        (args.out_dir / d).mkdir(parents=True, exist_ok=True)
    finder = ImageFinder(*image_roots(args.xml_dir.resolve(), args.images.resolve() if args.images else None))
    line_types = frozenset(args.line_type)
    with ProcessPoolExecutor(max(args.workers, 1)) as pool:
        futures = [pool.submit(process_page, job, args.out_dir, finder, line_types, args.scale) for job in jobs]
        results = [f.result() for f in tqdm(as_completed(futures), total=len(futures), desc="pages")]
    for split in SPLITS:
        write_gt(args.out_dir / split, [r for r in results if r["split"] == split])
    summary = summarize(results, unlisted, not_found, corpus_licence(args.xml_dir.resolve(), args.licence))
    (args.out_dir / "summary.json").write_text(json.dumps(summary, ensure_ascii=False, indent=1) + "\n",
                                               encoding="utf-8")
    print(format_summary(summary))


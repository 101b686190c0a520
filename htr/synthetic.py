"""Synthetic handwriting lines (the quick-start default data): texts, hands, line rendering and paper
(prepare_synthetic.py's docstring describes the data). Glyphs and the downloaded assets (fonts, MNIST, Shakespeare)
are htr/synth_glyphs.py's, the letters style is htr/synthetic_letters.py's, and the dataset writer (flat or sharded
layout, resuming, workers) is htr/synthetic_writer.py's.
"""
from dataclasses import dataclass, replace
from functools import cache

import cv2
import numpy as np

from htr.synth_glyphs import (DIGITS, HERSHEY_THIN, TTF_WEIGHTS, after_gaps, hershey_word, mnist_word, place,
                              shakespeare, ttf_word)
from htr.synthetic_letters import letter_marks, superscript_parts

HAND = {  # how hands vary from line to line (see sample_style, render_line, sample_text)
    "stretch": (0.75, 1.35),  # letter width factor, log-uniform: narrow to wide hands
    "wobble": (0.5, 1.5),  # letter-to-letter variation of size, width, shear, baseline (synth_glyphs.glyph_shapes)
    "weights": True,  # draw variable TrueType fonts at several weights (synth_glyphs.TTF_WEIGHTS)
    "neighbours": 0.4,  # chance of ink from the line above, and separately from the line below, in the margin
    "wave": 0.25,  # largest baseline wave amplitude / letter size
    "slant": (0.12, 0.12),  # mean and sd of the shear (positive leans right)
    "length": (44, 13, 12, 80),  # characters per line (IAM-like): mean, sd, clipped to [12, 80]
    "ampersand": 0.3,  # chance that a line writes "and" as "&"
}

SPLITS = {"train": 0.8, "val": 0.1, "test": 0.1}
FONTS = {  # split: (Hershey fonts, TrueType fonts); val and test hands are held out of train
    "train": (["scripts", "futural", "rowmans", "timesi"],
              ["caveat", "dancing", "great-vibes", "intuitive", "kalam", "kalam-light", "yellowtail"]),
    "val": (["scriptc"], ["shadows", "delius"]),
    "test": (["cursive"], ["zeyada", "indie-flower", "satisfy"]),
}
PLAYS = {  # held-out plays; every other play is train text
    "val": ["tragedies/macbeth", "comedies/much-ado-about-nothing", "roman/julius-caesar"],
    "test": ["tragedies/hamlet", "romances/the-tempest", "comedies/twelfth-night", "histories/richard-iii"],
}
MNIST_PART = {"train": "train", "val": "valid", "test": "test"}
MNIST_SEPARATORS = ".,/-:#+*()"  # drawn with a Hershey font between MNIST digits
PREFIXES = ["No.", "Tel.", "Total:", "Date:", "Page", "Room", "Ref.", "Box", "Vol.", "Flat", "Order", "Cheque"]


# ---------------------------------------------------------------------------------------------- texts
def split_speeches(split: str) -> list[list[str]]:
    plays = shakespeare()
    names = PLAYS.get(split) or [p for p in plays if not any(p in held for held in PLAYS.values())]
    return [speech for name in names for speech in plays[name]]


def number(rng: np.random.Generator) -> str:
    d, m, y = rng.integers(1, 29), rng.integers(1, 13), rng.integers(1900, 2030)
    a, b = rng.integers(1, 10 ** rng.integers(1, 7)), rng.integers(1, 100)
    forms = [f"{d}/{m}/{y}", f"{d}.{m:02d}.{y % 100:02d}", str(a), f"{a:,}.{b:02d}", f"{rng.integers(100, 1000)}-{a}",
             f"#{a}", f"{a}+{b}", f"{b}*{d}", f"({a})", f"{d}:{b:02d}"]
    return forms[rng.integers(len(forms))]


def sample_text(words: list[str], rng: np.random.Generator, length: tuple = HAND["length"]) -> str:
    """A number line (6%) or a run of words from the split's running text, of IAM-like `length` (mean, sd, lowest,
    highest)."""
    if rng.random() < 0.06:
        tokens = [number(rng) for _ in range(rng.integers(1, 5))]
        if rng.random() < 0.5:
            tokens.insert(0, PREFIXES[rng.integers(len(PREFIXES))])
        return " ".join(tokens)
    mean, sd, lo, hi = length
    start, target = rng.integers(len(words) - 100), np.clip(rng.normal(mean, sd), lo, hi)
    line = words[start]
    for w in words[start + 1:start + 100]:
        if len(line) + 1 + len(w) > target:
            break
        line += " " + w
    if rng.random() < HAND["ampersand"]:  # "&" for "and", as many hands (and letters) write it
        line = " ".join("&" if w == "and" else w for w in line.split(" "))
    return f'"{line}"' if rng.random() < 0.04 else line  # quoted speech, frequent in IAM


# ---------------------------------------------------------------------------------------------- hands
@dataclass
class Style:
    source: str  # "hershey" or "ttf"
    font: str
    size: float  # letter size in pixels: Hershey cap height, twice the TrueType x-height
    pen: int  # stroke width in pixels
    slant: float  # shear, positive leans right
    spacing: float  # word gap / size
    mnist: str | None  # MNIST part drawing digit tokens, None: the font draws them
    stroke_font: str  # Hershey font for the separators between MNIST digits
    stretch: float = 1.0  # letter width factor: narrow (< 1) or wide (> 1) hands
    wobble: float = 0.0  # letter-to-letter variation of size, width, shear and baseline (0 = none)
    weight: int = 0  # weight of a variable TrueType font (0 = its default)
    letters: bool = False  # the letters style: raised abbreviations, ruling, bleed-through (htr/synthetic_letters.py)


def sample_style(split: str, rng: np.random.Generator) -> Style:
    hershey, ttf = FONTS[split]
    source = "hershey" if rng.random() < 0.4 else "ttf"
    fonts = hershey if source == "hershey" else ttf
    font, size = fonts[rng.integers(len(fonts))], rng.uniform(26, 42)
    if source == "hershey":
        pen = 1 if font in HERSHEY_THIN else 1 + int(rng.random() < (size - 20) / 20)
    else:
        pen = 1 + int(rng.random() < 0.2)
    mnist_part = MNIST_PART[split] if rng.random() < 0.6 else None
    slant, spacing = rng.normal(*HAND["slant"]), rng.uniform(0.35, 0.8)
    lo, hi = HAND["stretch"]
    stretch = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
    wobble = rng.uniform(*HAND["wobble"])
    weights = TTF_WEIGHTS.get(font, (0,)) if HAND["weights"] else (0,)
    weight = int(weights[rng.integers(len(weights))])
    return Style(source, font, size, pen, slant, spacing, mnist_part, hershey[0], stretch, wobble, weight)


def render_word(word: str, style: Style, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    parts = superscript_parts(word) if style.letters else None
    if parts:
        return raised_word(*parts, style, rng)
    if style.mnist and any(c in DIGITS for c in word) and all(c in DIGITS + MNIST_SEPARATORS for c in word):
        return mnist_word(word, style.mnist, style.stroke_font, style.size, style.pen, rng, style.stretch)
    if style.source == "hershey":
        return hershey_word(word, style.font, style.size, style.pen, rng, style.stretch, style.wobble)
    return ttf_word(word, style.font, style.size, style.pen, rng, style.stretch, style.wobble, style.weight)


def raised_word(base: str, raised: str, tail: str, style: Style, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """An abbreviation as letter writers wrote it: its last letters smaller and raised (Mr, yrs, recd), then any
    punctuation on the baseline."""
    small = replace(style, size=style.size * rng.uniform(0.5, 0.7), letters=False)
    lift = -int(style.size * rng.uniform(0.3, 0.5))
    pieces = [render_word(base, style, rng), render_word(raised, small, rng)]
    pieces += [render_word(tail, style, rng)] if tail else []
    gaps = [int(style.size * rng.uniform(-0.08, 0.04)) for _ in pieces]              # glyph masks have margins
    return place(pieces, after_gaps(pieces, gaps), [0, lift, 0][:len(pieces)])


def warp(mask: np.ndarray, baseline: int, slant: float, amplitude: float, rng: np.random.Generator) -> np.ndarray:
    """Slant (shear about the baseline) and a smooth random displacement (a few pixels over ~30 px wavelengths)
    of the whole line, in one remap."""
    h, w = mask.shape
    shift = slant * (baseline - np.arange(h, dtype=np.float32))  # x shift of every row
    w += int(np.ceil(abs(slant) * h))
    coarse = rng.normal(0, amplitude, (2, 3, w // 30 + 2)).astype(np.float32)
    dx, dy = (cv2.resize(c, (w, h), interpolation=cv2.INTER_CUBIC) for c in coarse)
    map_x = dx + np.arange(w, dtype=np.float32) - (shift - shift.min())[:, None]
    map_y = dy + np.arange(h, dtype=np.float32)[:, None]
    return cv2.remap(mask, map_x, map_y, cv2.INTER_LINEAR, borderValue=0)


def render_line(text: str, style: Style, rng: np.random.Generator) -> np.ndarray:
    """Ink mask (uint8, 255 = ink) of one handwritten line."""
    pieces = []
    for word in text.split(" "):
        mask, baseline = render_word(word, style, rng)
        pieces.append(((mask * rng.uniform(0.75, 1.0)).astype(np.uint8), baseline))  # ink pressure per word
    n = len(pieces)
    amp, period, phase = rng.uniform(0, HAND["wave"]) * style.size, rng.uniform(4, 12), rng.uniform(0, 2 * np.pi)
    dys = [int(amp * np.sin(2 * np.pi * i / period + phase) + rng.normal(0, 0.04 * style.size)) for i in range(n)]
    gaps = [int(style.size * style.spacing * rng.uniform(0.7, 1.3)) for _ in range(n)]
    mask, baseline = place(pieces, after_gaps(pieces, gaps), dys)
    mask = warp(mask, baseline, style.slant, rng.uniform(0.4, 1.5), rng)                  # rows stay where they were
    if style.letters:
        mask = letter_marks(mask, baseline, style.size, rng)
    return neighbours(mask, rng)


def neighbours(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Descenders of the line above and ascenders of the line below reaching into the margins, as in lines cut
    from a page: the bottom (top) rows of another stretch of ink above (below) the line, a few pixels away."""
    h, w = mask.shape
    above, below = (rng.random(2) < HAND["neighbours"]).tolist()
    if not (above or below):
        return mask
    other = np.roll(mask[:, ::-1], int(rng.integers(w)), axis=1)  # mirrored and shifted: other letters
    other = (other * np.float32(rng.uniform(0.6, 1.0))).astype(np.uint8)
    gaps = [np.zeros((int(rng.integers(0, max(2, h // 8))), w), np.uint8) for _ in range(2)]
    k_above, k_below = (h * rng.uniform(0.1, 0.3, 2)).astype(int)
    return np.vstack(([other[h - k_above:], gaps[0]] if above else []) + [mask] +
                     ([gaps[1], other[:k_below]] if below else []))


# ---------------------------------------------------------------------------------------------- paper
@cache
def paper_textures(seed: int, h: int = 192, w: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """(blotches, grain): a smooth low-frequency paper tone field and per-pixel noise, shared by all lines."""
    rng = np.random.default_rng(seed)
    coarse = rng.normal(0, 1, (h // 24, w // 24)).astype(np.float32)
    blotches = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
    fibres = cv2.GaussianBlur(rng.normal(0, 1, (h, w)).astype(np.float32), (0, 0), sigmaX=3, sigmaY=0.7)
    return blotches + 2 * fibres, rng.normal(0, 1, (h, w)).astype(np.float32)


def crop_texture(tex: np.ndarray, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    reps = (-(-h // tex.shape[0]), -(-w // tex.shape[1]))
    tex = np.tile(tex, reps) if max(reps) > 1 else tex
    y, x = rng.integers(tex.shape[0] - h + 1), rng.integers(tex.shape[1] - w + 1)
    return tex[y:y + h, x:x + w]


def on_paper(mask: np.ndarray, rng: np.random.Generator, seed: int) -> np.ndarray:
    """Dark ink on light, textured, slightly blurred and noisy paper, with margins."""
    top, bottom, left, right = rng.integers(6, 16, 2).tolist() + rng.integers(5, 25, 2).tolist()
    mask = cv2.copyMakeBorder(mask, top, bottom, left, right, cv2.BORDER_CONSTANT, value=0)
    h, w = mask.shape
    blotches, grain = paper_textures(seed)
    paper = crop_texture(blotches, h, w, rng) * rng.uniform(1, 6) + rng.uniform(195, 245)
    img = paper - (paper - rng.uniform(10, 90)) * (mask * np.float32(1 / 255))  # alpha-blend the ink
    if rng.random() < 0.7:
        img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.3, 0.9))
    contrast = rng.uniform(0.75, 1.1)
    img = cv2.addWeighted(img, contrast, crop_texture(grain, h, w, rng), rng.uniform(1, 5), 128 * (1 - contrast))
    return np.clip(img, 0, 255, out=img).astype(np.uint8)

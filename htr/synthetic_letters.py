"""The `letters` style of the synthetic generator (prepare_synthetic.py --style letters): lines closer to
19th-century correspondence. Letter writers' abbreviations with their last letters raised and smaller (Mr, yrs,
recd), a wider spread of line lengths, faint ruled lines and ink bleeding through from the back of the sheet. Each
feature is drawn per line from the line's own generator; the default style never calls this module.
"""
import cv2
import numpy as np

LETTERS = {  # how letters-style lines vary (see abbreviate, letter_marks)
    "length": (40, 18, 4, 90),  # characters per line: mean, sd, clipped to [4, 90] (dates, salutations, long lines)
    "abbreviate": 0.8,  # chance that a word letter writers shortened (ABBREVIATIONS) is written short
    "insert": 0.25,  # chance of one more abbreviation (INSERTED) put into a line
    "ruling": 0.5,  # chance of faint ruled lines
    "bleed": 0.35,  # chance of mirrored ink showing through from the back of the sheet
}
ABBREVIATIONS = {  # word: (abbreviation, how many of its last letters are raised)
    "Master": ("Mr", 1), "Mistress": ("Mrs", 2), "Doctor": ("Dr", 1), "yours": ("yrs", 2), "your": ("yr", 1),
    "received": ("recd", 1), "should": ("shd", 1), "would": ("wd", 1), "which": ("wh", 1),
    "affectionately": ("affly", 2), "Esquire": ("Esqr", 1), "September": ("Sept", 1), "October": ("Octr", 1),
    "November": ("Novr", 1), "December": ("Decr", 1), "January": ("Jany", 1), "February": ("Feby", 1),
}
INSERTED = {"Mr": 1, "Mrs": 2, "Dr": 1, "&c": 1, "yrs": 2, "Evr": 1}  # the Hooker letters' most frequent ones
RAISED = INSERTED | {short: k for short, k in ABBREVIATIONS.values()}
RAISED |= {s[:1].upper() + s[1:]: k for s, k in RAISED.items()}  # "Yrs" at the start of a sentence
TRAILING = ".,;:!?'\")"  # punctuation after an abbreviation stays on the baseline


# ---------------------------------------------------------------------------------------------- texts
def shorten(word: str) -> str:
    """The abbreviation of `word` (its punctuation kept, a capital kept), or the word itself."""
    core = word.rstrip(TRAILING)
    short, _ = ABBREVIATIONS.get(core) or ABBREVIATIONS.get(core[:1].lower() + core[1:], (core, 0))
    if core[:1].isupper():
        short = short[:1].upper() + short[1:]
    return short + word[len(core):]


def abbreviate(text: str, rng: np.random.Generator) -> str:
    """Words written short as letter writers did, and now and then one more abbreviation put in."""
    words = [shorten(w) if rng.random() < LETTERS["abbreviate"] else w for w in text.split(" ")]
    if rng.random() < LETTERS["insert"]:
        words.insert(int(rng.integers(len(words) + 1)), list(INSERTED)[rng.integers(len(INSERTED))])
    return " ".join(words)


def superscript_parts(word: str) -> tuple[str, str, str] | None:
    """(base, raised letters, trailing punctuation) of an abbreviation written with raised letters, else None."""
    core = word.rstrip(TRAILING)
    k = RAISED.get(core)
    return (core[:-k], core[-k:], word[len(core):]) if k else None


# ---------------------------------------------------------------------------------------------- the sheet
def ruling(mask: np.ndarray, baseline: int, size: float, rng: np.random.Generator) -> np.ndarray:
    """Faint ruled lines of writing paper, straight and a little tilted: one near the baseline (a hand writes on
    the rule, never exactly) and the rule of the line above where the line is tall enough to show it."""
    h, w = mask.shape
    rules = np.zeros_like(mask)
    y0, slope = baseline + rng.normal(0, 0.08 * size), rng.normal(0, 0.002)
    tone, width = int(rng.integers(25, 60)), int(rng.integers(1, 3))
    for y in (y0, y0 - rng.uniform(2.2, 3.2) * size):
        if 0 <= y < h:
            cv2.line(rules, (0, int(round(y * 4))), (w - 1, int(round((y + slope * w) * 4))), tone, width,
                     cv2.LINE_AA, shift=2)
    return np.maximum(mask, rules)


def bleed_through(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Ink of the back of the sheet showing through: the line's own ink (the back is in the same hand) mirrored
    left to right, shifted, blurred by the paper and faint."""
    h, w = mask.shape
    shift = (int(rng.integers(-h // 3, h // 3 + 1)), int(rng.integers(w)))
    back = cv2.GaussianBlur(np.roll(mask[:, ::-1], shift, axis=(0, 1)), (0, 0), rng.uniform(0.8, 2.0))
    return np.maximum(mask, (back * np.float32(rng.uniform(0.08, 0.22))).astype(np.uint8))


def letter_marks(mask: np.ndarray, baseline: int, size: float, rng: np.random.Generator) -> np.ndarray:
    """What the sheet adds to a line's ink mask: bleed-through, then ruling, each with its LETTERS chance."""
    if rng.random() < LETTERS["bleed"]:
        mask = bleed_through(mask, rng)
    if rng.random() < LETTERS["ruling"]:
        mask = ruling(mask, baseline, size, rng)
    return mask

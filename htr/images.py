"""Line images: reading any image file as a grey dark-ink line, and upstream's preprocessing (inverted, resized into
the canvas, centred). Used by the datasets (cache build), the demo and later transcription.
"""
import logging
from pathlib import Path

import cv2
import numpy as np
import torch

log = logging.getLogger("htr")

# OpenCV's thread pool and fork() do not mix: a DataLoader worker forked after the parent used that pool from a
# thread (the cache build does) hangs as soon as it touches the pool (cv2.setNumThreads in a worker_init_fn did; the
# paper config hung at its first batch). Our own threads (cache) and worker processes (augmentation) already run
# lines in parallel, so OpenCV stays single-threaded everywhere: set once, here, in the main process, before any
# loader forks, as albumentations recommends.
cv2.setNumThreads(0)
cv2.ocl.setUseOpenCL(False)


def read_image(path) -> np.ndarray:
    """
    Any format OpenCV reads (png, jpg, tif, ...; grey, colour or palette, with or without alpha, 8 or 16 bit) ->
    uint8 grey (h, w), dark ink on a light background (`to_grey`, `dark_on_light`); ValueError if unusable.
    JPEGs (never transparent) are read so that OpenCV applies their EXIF orientation; other files as stored, since
    only that keeps their alpha (and then ignores an orientation tag).
    """
    if not Path(path).is_file():
        raise ValueError("image file not found")
    try:
        with open(path, "rb") as f:
            jpeg = f.read(2) == b"\xff\xd8"
    except OSError as e:
        raise ValueError(f"unreadable image file ({e.strerror})") from None
    img = cv2.imread(str(path), cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR if jpeg else cv2.IMREAD_UNCHANGED)
    if img is None:
        raise ValueError("unreadable or corrupt image")
    if img.size == 0:
        raise ValueError("zero-size image")
    return dark_on_light(to_grey(img))


def to_grey(img: np.ndarray) -> np.ndarray:
    """
    Decoded samples (h, w[, c]), grey, grey + alpha, BGR or BGRA of any depth -> uint8 grey (h, w). Colour becomes
    luma (0.299 R + 0.587 G + 0.114 B, as OpenCV's grey reading); transparency is composited on white, so black ink
    on a transparent background stays black on white; samples deeper than 8 bit are scaled by `unit_scale`.
    """
    planes = img.reshape(*img.shape[:2], -1)                               # (h, w, c)
    channels = planes.shape[2]
    alpha = planes[..., -1] if channels in (2, 4) else None
    if channels >= 3:
        grey = cv2.cvtColor(planes, cv2.COLOR_BGRA2GRAY if channels == 4 else cv2.COLOR_BGR2GRAY)
    else:
        grey = planes[..., 0]
    if grey.dtype == np.uint8 and alpha is None:
        return grey
    grey = grey * unit_scale(planes[..., :channels - (alpha is not None)])  # (h, w) float in [0, 1]
    if alpha is not None:
        opacity = alpha / (np.iinfo(alpha.dtype).max if alpha.dtype.kind in "ui" else 1.0)
        grey = grey * opacity + (1 - opacity)
    return np.rint(np.clip(grey, 0, 1) * 255).astype(np.uint8)


def unit_scale(samples: np.ndarray) -> float:
    """
    The factor that maps image samples to [0, 1]: floats are taken as [0, 1]; integers are divided by the largest
    value of the bit depth their maximum needs, at least 8 bit. A 16-bit file from a 12-bit scanner (0..4095) thus
    reads like its 8-bit export instead of almost black (/257 would give 0..15), a full-range one is /257, and the
    tones stay as scanned (no contrast stretch: 8-bit lines are not stretched either).
    """
    if samples.dtype.kind == "f":
        return 1.0
    return 1.0 / (2 ** max(8, int(samples.max()).bit_length()) - 1)


def dark_on_light(grey: np.ndarray) -> np.ndarray:
    """
    `grey` (uint8) with dark ink on a light background: a light-on-dark line (white on black, an inverted scan) is
    inverted. The background is most of a line image, so its level is the median; the line is light-on-dark when
    the median lies in the darkest quarter of the range between the 1st and 99th percentiles (the ink is far
    brighter than the background). Anything less clear (flat, noisy, without ink) is kept, so noise never flips a
    dark-ink line. One histogram: cheap enough for every training line.
    """
    cdf = np.cumsum(np.bincount(grey.ravel(), minlength=256))
    low, median, high = np.searchsorted(cdf, np.array([0.01, 0.5, 0.99]) * cdf[-1])
    return 255 - grey if median < low + (high - low) / 4 else grey


def fit(h: int, w: int, height: int, width: int) -> tuple:
    """(scale, h', w'): an h x w image resized to fit (height-16) x (width-16), aspect kept."""
    scale = min((height - 16) / h, (width - 16) / w)
    return scale, max(1, round(h * scale)), max(1, round(w * scale))


def preprocess(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """Grey dark-ink image -> inverted (ink bright) uint8, resized to fit (height-16) x (width-16), aspect kept."""
    scale, h, w = fit(*img.shape, height, width)
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    return cv2.resize(255 - img, (w, h), interpolation=interp)


def pad_center(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """Centre a preprocessed line on a (height, width) canvas of the background value 0."""
    h, w = img.shape
    canvas = np.zeros((height, width), np.uint8)
    top, left = (height - h) // 2, (width - w) // 2
    canvas[top:top + h, left:left + w] = img
    return canvas


def canvas(grey: np.ndarray, height: int, width: int) -> np.ndarray:
    """A grey dark-ink line (h, w) uint8 -> the model's (height, width) canvas, as training prepares lines."""
    return pad_center(preprocess(grey, height, width), height, width)


def to_tensor(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(img).float().div_(255).unsqueeze(0)            # (1, H, W)


def load_for_inference(path, height: int, width: int) -> torch.Tensor:
    """One image file -> model input (1, H, W), with a logged warning if it makes a poor text line (`fit_warning`);
    used by demo.py."""
    img = read_image(path)
    problem = fit_warning(*img.shape, height, width)
    if problem:
        log.warning("%s: %s", path, problem)
    return to_tensor(canvas(img, height, width))


def fit_warning(h: int, w: int, height: int, width: int) -> str | None:
    """
    What makes an h x w image a poor single text line on a (height, width) canvas, or None: taller than wide (a
    paragraph or page); filling under a quarter of the canvas width (a single word, or a block of several lines);
    or text under a third of the canvas height (a very long line, shrunk). Says what `preprocess` did with it.
    """
    _, fit_h, fit_w = fit(h, w, height, width)
    done = f"aspect ratio {w / h:.1f} (w/h), scaled to {fit_h}x{fit_w} px (h x w) inside the {height}x{width} canvas"
    cut = "a paragraph or page should be cut into lines first (prepare_pages.py)"
    if h > w:
        return f"{done}: taller than wide, not a text line; {cut}"
    if fit_w < (width - 16) / 4:
        return f"{done}: a single word reads less reliably than a line; {cut}"
    if fit_h < (height - 16) / 3:
        return f"{done}: the text is only {fit_h} px high; cut the line into shorter pieces"
    return None

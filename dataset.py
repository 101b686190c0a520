"""Line datasets: `<root>/<split>/<id>.png` + `<root>/<split>/gt.txt` (`<id> <transcription>` per line).

Lines are validated on load (bad ones are skipped and listed in one warning), preprocessed once as upstream
(grey, ink bright on a dark background, aspect-preserving resize into (H-16) x (W-16)) and cached as uint8, in
memory and optionally on disk, so later epochs only pad, augment and convert.
"""
import hashlib
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from utils import Charset, UserError, normalize_text

log = logging.getLogger("htr")
CACHE_VERSION = 1


# --------------------------------------------------------------------------------------------------- preprocessing

def read_image(path) -> np.ndarray:
    """Any format OpenCV reads (png, jpg, tif; grey or colour) -> uint8 grey (h, w); ValueError if unusable."""
    if not Path(path).is_file():
        raise ValueError("image file not found")
    img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if img is None:
        raise ValueError("unreadable or corrupt image")
    if img.size == 0:
        raise ValueError("zero-size image")
    return img


def preprocess(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """Grey dark-ink image -> inverted (ink bright) uint8, resized to fit (height-16) x (width-16), aspect kept."""
    h, w = img.shape
    scale = min((height - 16) / h, (width - 16) / w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    return cv2.resize(255 - img, size, interpolation=interp)


def pad_center(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """Centre a preprocessed line on a (height, width) canvas of the background value 0."""
    h, w = img.shape
    canvas = np.zeros((height, width), np.uint8)
    top, left = (height - h) // 2, (width - w) // 2
    canvas[top:top + h, left:left + w] = img
    return canvas


def to_tensor(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(img).float().div_(255).unsqueeze(0)            # (1, H, W)


def load_for_inference(path, height: int, width: int) -> torch.Tensor:
    """One image file -> model input (1, H, W); used by demo.py."""
    return to_tensor(pad_center(preprocess(read_image(path), height, width), height, width))


def build_augmentation(seed: int = 0):
    """Training augmentation on the padded, inverted line (background 0), as upstream."""
    import albumentations as A
    const = dict(border_mode=cv2.BORDER_CONSTANT, fill=0)
    return A.Compose([
        A.Affine(scale=(0.8, 1.0), rotate=(-2, 2), shear={"x": (-10, 10), "y": (-2, 2)}, p=0.5, **const),
        A.OneOf([A.GridDistortion(num_steps=5, distort_limit=0.2, **const),
                 A.ElasticTransform(alpha=20, sigma=6, **const)], p=0.3),
        A.OneOf([A.Morphological(scale=(2, 3), operation="erosion"),
                 A.Morphological(scale=(2, 3), operation="dilation")], p=0.3),
        A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=0.5),
        A.RandomGamma(gamma_limit=(80, 120), p=0.3),
    ], seed=seed)


# ------------------------------------------------------------------------------------------------- ground truth

def read_gt(split_dir: Path) -> tuple:
    """gt.txt -> ([(id, text)], [(where, reason)]); malformed lines are reported, not fatal."""
    gt = split_dir / "gt.txt"
    if not gt.is_file():
        raise UserError(f"no ground truth file {gt} (expected <id> <transcription> per line)")
    entries, problems, seen = [], [], set()
    for n, line in enumerate(gt.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        where = f"{gt}:{n}"
        if not line.strip():
            continue
        line_id, sep, text = line.partition(" ")
        text = normalize_text(text.strip())
        if not sep:
            problems.append((where, "no space between id and transcription"))
        elif not text:
            problems.append((where, f"empty transcription for {line_id}"))
        elif line_id in seen:
            problems.append((where, f"duplicate id {line_id}"))
        else:
            seen.add(line_id)
            entries.append((line_id, text))
    return entries, problems


def _cache_key(split_dir: Path, entries, height: int, width: int) -> str:
    h = hashlib.sha1(f"v{CACHE_VERSION} {height}x{width}".encode())
    for line_id, _ in entries:
        path = split_dir / f"{line_id}.png"
        st = path.stat() if path.exists() else None
        h.update(f"{line_id} {st.st_mtime_ns if st else -1} {st.st_size if st else -1}\n".encode())
    return h.hexdigest()[:16]


def _preprocess_file(path: Path, height: int, width: int):
    try:
        return preprocess(read_image(path), height, width), None
    except ValueError as e:
        return None, str(e)


def _decode_all(split_dir: Path, entries, height: int, width: int) -> tuple:
    paths = [split_dir / f"{line_id}.png" for line_id, _ in entries]
    with ThreadPoolExecutor() as pool:                                     # OpenCV releases the GIL
        results = list(pool.map(lambda p: _preprocess_file(p, height, width), paths))
    images = [img for img, _ in results]
    bad = {line_id: err for (line_id, _), (_, err) in zip(entries, results) if err}
    return images, bad


def _load_cache(path: Path, entries) -> tuple:
    """Cached images in gt order; a (0, 0) shape marks a bad line whose reason is in bad_ids/bad_why."""
    with np.load(path) as z:
        pixels, shapes = z["pixels"], z["shapes"]
        bad = dict(zip(z["bad_ids"].tolist(), z["bad_why"].tolist()))
    if len(shapes) != len(entries):
        raise ValueError("entry count differs")
    chunks = np.split(pixels, np.cumsum(shapes.prod(1))[:-1])
    images = [c.reshape(s) if s.all() else None for c, s in zip(chunks, shapes)]
    return images, bad


def _save_cache(path: Path, images, bad) -> None:
    shapes = np.array([img.shape if img is not None else (0, 0) for img in images], np.int64).reshape(-1, 2)
    pixels = np.concatenate([img.ravel() for img in images if img is not None] + [np.zeros(0, np.uint8)])
    tmp = path.with_name(path.name + ".tmp.npz")
    try:
        np.savez(tmp, pixels=pixels, shapes=shapes,
                 bad_ids=np.array(list(bad), dtype=str), bad_why=np.array(list(bad.values()), dtype=str))
        tmp.replace(path)
    except OSError as e:
        log.warning("could not write preprocessing cache %s (%s); continuing without it", path, e)


# ----------------------------------------------------------------------------------------------------- dataset

class LineDataset(Dataset):
    """One split of a line dataset; items are (image (1, H, W) float in [0, 1], text, id)."""

    def __init__(self, root, split: str, height: int, width: int, cache: bool = True, augment: bool = False):
        self.split_dir = Path(root) / split
        self.height, self.width = height, width
        if not self.split_dir.is_dir():
            raise UserError(f"split directory not found: {self.split_dir} (expected data.path/{split}/ "
                            f"with <id>.png files and gt.txt)")
        entries, problems = read_gt(self.split_dir)
        images, bad = self._load_images(entries, cache)
        problems += [(f"{self.split_dir / 'gt.txt'} id {i}", f"{why}: {self.split_dir / i}.png")
                     for i, why in bad.items()]
        keep = [k for k, (line_id, _) in enumerate(entries) if line_id not in bad]
        self.ids = [entries[k][0] for k in keep]
        self.texts = [entries[k][1] for k in keep]
        self.images = [images[k] for k in keep]
        self.skipped = problems
        if problems:
            listing = "\n  ".join(f"{where}: {why}" for where, why in problems[:50])
            more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
            log.warning("%s: skipped %d line(s):\n  %s%s", self.split_dir, len(problems), listing, more)
        if not self.ids:
            raise UserError(f"no valid lines in {self.split_dir} ({len(problems)} skipped); "
                            f"check gt.txt and the images")
        self.transform = build_augmentation() if augment else None

    def _load_images(self, entries, cache: bool) -> tuple:
        if not cache:
            return _decode_all(self.split_dir, entries, self.height, self.width)
        path = self.split_dir / f".cache-{_cache_key(self.split_dir, entries, self.height, self.width)}.npz"
        if path.is_file():
            try:
                return _load_cache(path, entries)
            except (OSError, ValueError, KeyError) as e:
                log.warning("ignoring unreadable cache %s (%s)", path, e)
        images, bad = _decode_all(self.split_dir, entries, self.height, self.width)
        _save_cache(path, images, bad)
        return images, bad

    def reseed(self, seed: int) -> None:
        """Make augmentation reproducible: called per epoch (main process) and per worker."""
        if self.transform is not None:
            self.transform.set_random_seed(seed % 2**32)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        img = pad_center(self.images[i], self.height, self.width)          # (H, W) uint8
        if self.transform is not None:
            img = self.transform(image=img)["image"]
        return to_tensor(img), self.texts[i], self.ids[i]


def seed_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: derive the augmentation seed from the loader's per-epoch generator."""
    torch.set_num_threads(1)                                               # the main process trains on the cores
    cv2.setNumThreads(1)
    torch.utils.data.get_worker_info().dataset.reseed(torch.initial_seed())


class Collate:
    """Batch items into images (B, 1, H, W), concatenated CTC targets, their lengths, texts and ids."""

    def __init__(self, charset: Charset):
        self.charset = charset

    def __call__(self, batch):
        images, texts, ids = zip(*batch)
        encoded = [self.charset.encode(t) for t in texts]
        targets = torch.tensor([c for e in encoded for c in e], dtype=torch.long)
        lengths = torch.tensor([len(e) for e in encoded], dtype=torch.long)
        return torch.stack(images), targets, lengths, list(texts), list(ids)

"""Line datasets: `<root>/<split>/<id>.png` + `<root>/<split>/gt.txt` (`<id> <transcription>` per line), or a
sharded split, `<root>/<split>/shard-*/` each with its own PNGs and gt.txt (read as the union of its complete shards).

Lines are validated on load (bad ones are skipped and listed in one warning), read and preprocessed once as
upstream (htr/images.py: grey, ink bright on a dark background, aspect-preserving resize into (H-16) x (W-16)) and cached
as uint8 per folder (split or shard) on disk, memory-mapped, so later epochs only pad, augment and convert and a
split larger than RAM is read on demand (without the cache: decoded into memory). Training batches come from
EpochBatchSampler (reproducible from the seed and the epoch, sharded over processes, resumable mid-epoch) and are
augmented with a seed per (epoch, line), so what a line looks like does not depend on worker count or order.
"""
import ctypes
import hashlib
import logging
import math
import random
import signal
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple, Optional

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from htr.images import pad_center, preprocess, read_image, to_tensor
from utils import Charset, UserError, atomic_write, normalize_text, usable_cpus

log = logging.getLogger("htr")
CACHE_VERSION = 3                                     # 3: pixels in a memory-mapped .npy


# ------------------------------------------------------------------------------------------------- augmentation

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


class PackedLines(Sequence):
    """The preprocessed lines of one folder, back to back in the cache's flat uint8 pixels file, memory-mapped on
    first use in each process: the page cache holds them, not the process, so a split larger than RAM trains, and
    forked loader workers share the pages. A (0, 0) shape is a bad line (None)."""

    def __init__(self, path: Path, shapes: np.ndarray):
        self.path, self.shapes = path, shapes
        self.offsets = np.concatenate([[0], np.cumsum(shapes.prod(1))])
        self._pixels = None

    def check(self) -> None:
        """Raise ValueError unless the pixels file holds exactly the pixels the shapes need (read its header only:
        one open map per shard for the whole run would exhaust file descriptors sooner)."""
        with open(self.path, "rb") as f:
            np.lib.format.read_magic(f)
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
            size = self.path.stat().st_size - f.tell()
        if shape != (self.offsets[-1],) or dtype != np.uint8 or size != self.offsets[-1]:
            raise ValueError(f"{self.path.name} holds {shape} {dtype}, {size} bytes; expected {self.offsets[-1]}")

    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, k: int):
        if not self.shapes[k].all():
            return None
        if self._pixels is None:
            self._pixels = np.load(self.path, mmap_mode="r")
        return self._pixels[self.offsets[k]:self.offsets[k + 1]].reshape(self.shapes[k])

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pixels": None}        # spawned workers map the file themselves, not a copy


class LineImages(Sequence):
    """The kept lines of every folder of a split by dataset index: images[k] of their folder (a list in memory or
    PackedLines)."""

    def __init__(self, folders: list):
        """folders: (images, kept indices into them) per folder, in dataset order."""
        self.folders = [images for images, _ in folders]
        self.folder = np.repeat(np.arange(len(folders)), [len(keep) for _, keep in folders])
        self.local = np.concatenate([np.asarray(keep, np.int64) for _, keep in folders] + [np.zeros(0, np.int64)])

    def __len__(self) -> int:
        return len(self.local)

    def __getitem__(self, i: int):
        return self.folders[self.folder[i]][self.local[i]]   # numpy raises IndexError past the end: iteration stops

    def select(self, keep: list) -> "LineImages":
        """The lines at dataset indices `keep`, in that order (nothing is copied but the index)."""
        chosen = LineImages([])
        chosen.folders, chosen.folder, chosen.local = self.folders, self.folder[keep], self.local[keep]
        return chosen


def _pixels_path(index: Path) -> Path:
    return index.with_suffix(".pixels.npy")


def _load_cache(index: Path, entries) -> tuple:
    """Cached images in gt order and the bad lines ({id: reason}) from the index (.npz) and pixels (.npy) files."""
    with np.load(index) as z:
        shapes = z["shapes"]
        bad = dict(zip(z["bad_ids"].tolist(), z["bad_why"].tolist()))
    if len(shapes) != len(entries):
        raise ValueError("entry count differs")
    images = PackedLines(_pixels_path(index), shapes)
    images.check()
    return images, bad


def _save_cache(index: Path, images, bad) -> None:
    """The pixels file first, streamed image by image (no second copy of a shard in memory), then the index: a
    cache is complete once its index exists."""
    shapes = np.array([img.shape if img is not None else (0, 0) for img in images], np.int64).reshape(-1, 2)
    try:
        with atomic_write(_pixels_path(index)) as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False,
                                                     "shape": (int(shapes.prod(1).sum()),)})
            for img in images:
                if img is not None:
                    f.write(np.ascontiguousarray(img, np.uint8).data)
        with atomic_write(index) as f:
            np.savez(f, shapes=shapes, bad_ids=np.array(list(bad), dtype=str),
                     bad_why=np.array(list(bad.values()), dtype=str))
        return True
    except OSError as e:
        log.warning("could not write preprocessing cache %s (%s); continuing without it", index, e)
        return False


def split_folders(split_dir: Path) -> list:
    """The folders holding a split's lines: the split folder when it has a gt.txt, else its complete shards
    (shard-*/ with a gt.txt, in name order); incomplete ones (no gt.txt: being written, or killed) are skipped with
    one warning."""
    if (split_dir / "gt.txt").is_file():
        return [split_dir]
    shards = sorted(d for d in split_dir.glob("shard-*") if d.is_dir())
    complete = [d for d in shards if (d / "gt.txt").is_file()]
    if len(complete) < len(shards):
        log.warning("%s: skipped %d incomplete shard(s) without gt.txt (being written, or killed: rerun the command "
                    "that writes them): %s", split_dir, len(shards) - len(complete),
                    ", ".join(d.name for d in shards if d not in complete))
    if not complete:
        raise UserError(f"no ground truth file {split_dir / 'gt.txt'} (expected <id> <transcription> per line)"
                        + (", and no complete shard (shard-*/gt.txt)" if shards else ""))
    return complete


# ----------------------------------------------------------------------------------------------------- dataset

def page_of(line_id: str) -> str:
    """The page a line was cut from: its id without the last part (prepare_pages.py: <page>_<NNN>; IAM:
    <form>-<NN>)."""
    cut = max(line_id.rfind("_"), line_id.rfind("-"))
    return line_id[:cut] if cut > 0 else line_id


def pages_drawn(line_ids, fraction: float, seed: int) -> set:
    """The pages of data.train_fraction: round(fraction x pages) of the lines' pages, at least one, drawn with
    `seed` (the trainer's lines and the beam search's LM text take the same pages)."""
    if not 0 < fraction <= 1:
        raise UserError(f"data.train_fraction must be in (0, 1], got {fraction!r}")
    pages = sorted({page_of(i) for i in line_ids})
    return set(random.Random(seed).sample(pages, max(1, round(fraction * len(pages)))))


def ctc_frames(text: str) -> int:
    """Frames CTC needs for a label: one per character plus a blank between each pair of repeated characters."""
    return len(text) + sum(a == b for a, b in zip(text, text[1:]))


class LineDataset(Dataset):
    """One split of a line dataset; items are (image (1, H, W) float in [0, 1], text, id).

    max_frames: skip (and report) lines whose label cannot fit that many CTC frames (the model's output length):
    CTC's loss for them is infinite, and zero_infinity would silently train on nothing."""

    def __init__(self, root, split: str, height: int, width: int, cache: bool = True, augment: bool = False,
                 max_frames: int | None = None):
        self.split_dir = Path(root) / split
        self.height, self.width = height, width
        if not self.split_dir.is_dir():
            raise UserError(f"split directory not found: {self.split_dir} (expected data.path/{split}/ "
                            f"with <id>.png files and gt.txt)")
        self.ids, self.texts, self.skipped, kept, seen = [], [], [], [], set()
        for folder in split_folders(self.split_dir):
            entries, keep, images = self._load_folder(folder, cache, max_frames, seen)
            ids = [entries[k][0] for k in keep]
            self.ids += ids
            seen.update(ids)
            self.texts += [entries[k][1] for k in keep]
            kept.append((images, keep))
        self.images = LineImages(kept)
        if self.skipped:
            listing = "\n  ".join(f"{where}: {why}" for where, why in self.skipped[:50])
            more = f"\n  ... and {len(self.skipped) - 50} more" if len(self.skipped) > 50 else ""
            log.warning("%s: skipped %d line(s):\n  %s%s", self.split_dir, len(self.skipped), listing, more)
        if not self.ids:
            raise UserError(f"no valid lines in {self.split_dir} ({len(self.skipped)} skipped); "
                            f"check gt.txt and the images")
        self.transform = build_augmentation() if augment else None
        self.epoch_seed = 0

    def _load_folder(self, folder: Path, cache: bool, max_frames: int | None, seen: set) -> tuple:
        """(entries, indices of the kept ones, images) of one folder's gt.txt; its skipped lines join self.skipped.
        An id in `seen` (read from an earlier shard) is a duplicate too."""
        entries, problems = read_gt(folder)
        images, bad = self._load_images(folder, entries, cache)
        gt = folder / "gt.txt"
        problems += [(f"{gt} id {i}", f"{why}: {folder / i}.png") for i, why in bad.items()]
        if max_frames is not None:
            bad.update(self._too_long(gt, entries, bad, max_frames, problems))
        again = {i for i, _ in entries if i in seen and i not in bad}      # sharded: ids must stay unique
        if again:
            problems += [(f"{gt} id {i}", "duplicate id, already in an earlier shard") for i in sorted(again)]
            bad.update(dict.fromkeys(again, "duplicate"))
        self.skipped += problems
        return entries, [k for k, (line_id, _) in enumerate(entries) if line_id not in bad], images

    @staticmethod
    def _too_long(gt: Path, entries, bad, max_frames: int, problems: list) -> dict:
        """Lines whose label needs more CTC frames than the model has; appended to `problems`."""
        long = {line_id: ctc_frames(text) for line_id, text in entries
                if line_id not in bad and ctc_frames(text) > max_frames}
        problems += [(f"{gt} id {i}",
                      f"label needs {n} CTC frames (characters + repeats) but the model outputs {max_frames}; "
                      f"widen preproc.image_width or split the line") for i, n in long.items()]
        return long

    def _load_images(self, folder: Path, entries, cache: bool) -> tuple:
        if not cache:
            return _decode_all(folder, entries, self.height, self.width)
        index = folder / f".cache-{_cache_key(folder, entries, self.height, self.width)}.npz"
        if index.is_file():
            try:
                return _load_cache(index, entries)
            except Exception as e:                       # truncated / foreign files: np.load raises many types
                log.warning("preprocessing cache %s is unreadable (%s: %s); rebuilding it", index,
                            type(e).__name__, e)
        images, bad = _decode_all(folder, entries, self.height, self.width)
        # reopened from disk, so that a split's decoded lines never stay in memory all at once
        return _load_cache(index, entries) if _save_cache(index, images, bad) else (images, bad)

    def keep_pages(self, fraction: float, seed: int) -> None:
        """Keep only the lines of a fraction of the pages (pages_drawn): a low-resource run (data.train_fraction)
        that takes whole pages, as a user with fewer transcribed pages has."""
        chosen, pages = pages_drawn(self.ids, fraction, seed), len({page_of(i) for i in self.ids})
        keep = [k for k, line_id in enumerate(self.ids) if page_of(line_id) in chosen]
        self.ids, self.texts = [self.ids[k] for k in keep], [self.texts[k] for k in keep]
        self.images = self.images.select(keep)
        log.info("%s: data.train_fraction=%g keeps %d of %d pages, %d lines", self.split_dir, fraction,
                 len(chosen), pages, len(keep))

    def set_epoch_seed(self, seed: int) -> None:
        """Augmentation of line i in this epoch is seeded by (seed, i): set before the epoch's loader starts (the
        workers it forks copy it), so a line looks the same whatever the worker count or resume point."""
        self.epoch_seed = seed

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        img = pad_center(self.images[i], self.height, self.width)          # (H, W) uint8
        if self.transform is not None:
            self.transform.set_random_state(*augmentation_rngs(self.epoch_seed, i))
            img = self.transform(image=img)["image"]
        return to_tensor(img), self.texts[i], self.ids[i]


def augmentation_rngs(epoch_seed: int, index: int) -> tuple:
    """The (numpy, python) generators that augment line `index` in an epoch, shared by all transforms of the
    pipeline. (albumentations' set_random_seed would give every transform its own generator with the same seed, so
    their apply-or-not draws would coincide: half the lines would pass through unchanged.)"""
    rng = np.random.default_rng([epoch_seed, index])
    return rng, random.Random(int(rng.integers(2**63)))


# ----------------------------------------------------------------------------------------------------- loading

class EpochBatchSampler(Sampler):
    """The batches of epoch e: a permutation seeded by (seed, e), cut into batches; process `rank` of
    `num_replicas` takes batches rank, rank + N, ... (wrapping around so that every process does the same number of
    steps), starting at `start_step` when a run resumes mid-epoch. Yields lists of dataset indices."""

    def __init__(self, size: int, batch_size: int, seed: int, shuffle: bool = True, num_replicas: int = 1,
                 rank: int = 0):
        self.size, self.batch_size, self.seed, self.shuffle = size, batch_size, seed, shuffle
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch for each process (what the LR schedule counts)."""
        return math.ceil(math.ceil(self.size / self.batch_size) / self.num_replicas)

    def batch(self, step: int) -> list:
        """Dataset indices of this process's batch at `step` of the current epoch."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        n_batches = math.ceil(self.size / self.batch_size)
        b = (step * self.num_replicas + self.rank) % n_batches
        return order[b * self.batch_size:(b + 1) * self.batch_size]

    def __iter__(self):
        for step in range(self.start_step, self.steps_per_epoch):
            yield self.batch(step)

    def __len__(self) -> int:
        return self.steps_per_epoch - self.start_step


def die_with_parent(signum: int = signal.SIGKILL) -> None:
    """Linux: send this process `signum` when its parent dies (SIGKILL: a killed trainer leaves no orphaned workers;
    SIGTERM: a trainer whose ablate.py was killed stops and writes last.pt)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signum)                                 # 1 = PR_SET_PDEATHSIG


STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def init_worker(_worker_id: int) -> None:
    """DataLoader worker_init_fn. One torch thread (the main process trains on the cores); never the trainer's
    stop handlers: Ctrl-C reaches the whole process group and the main process alone decides how to stop, so
    workers ignore SIGINT and die on SIGTERM; and death with the parent. The loader was started with the stop
    signals blocked (LineLoader), so no signal reaches a worker before this point."""
    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    die_with_parent()
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


class LineLoader(DataLoader):
    """A DataLoader whose workers are forked with SIGINT/SIGTERM blocked (init_worker then installs their own
    handling), so no stop signal ever runs the trainer's handler inside a worker."""

    def __iter__(self):
        old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            return super().__iter__()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)


def worker_count(requested: int, key: str, processes: int = 1) -> int:
    """`requested` loader workers, at most the CPUs this process may use (shared by the processes of a run)."""
    usable = max(1, usable_cpus() // processes)
    if requested > usable:
        log.info("%s=%d, but this process may use %d CPU(s): using %d worker(s)", key, requested, usable, usable)
        return usable
    return requested


def line_loader(dataset, charset: Charset, batch_size: int = 1, batch_sampler=None, workers: int = 0,
                timeout: float = 0, pin_memory: bool = False) -> DataLoader:
    """A loader of Collate batches, in order (or per batch_sampler). Its own generator keeps the global RNG
    untouched (resumed runs stay identical); `timeout` makes a stalled worker an error instead of a hang."""
    batching = {"batch_sampler": batch_sampler} if batch_sampler is not None else {"batch_size": batch_size}
    return LineLoader(dataset, **batching, num_workers=workers, collate_fn=Collate(charset),
                      worker_init_fn=init_worker, generator=torch.Generator(), timeout=timeout if workers else 0,
                      pin_memory=pin_memory)


class AudioBatch(NamedTuple):
    waves: torch.Tensor                   # (B, S) float32 at 16 kHz, zero-padded to the longest reading
    lengths: torch.Tensor                 # (B,) samples of each line's reading; 0 = none

    @classmethod
    def of(cls, waves) -> "AudioBatch":
        """From a list of (samples,) arrays or None (a line without audio)."""
        lengths = torch.tensor([0 if w is None else len(w) for w in waves], dtype=torch.long)
        batch = torch.zeros(len(waves), max(int(lengths.max()), 1))
        for row, w in zip(batch, waves):
            if w is not None:
                row[:len(w)] = torch.from_numpy(w)
        return cls(batch, lengths)


class Batch(NamedTuple):
    images: torch.Tensor                  # (B, 1, H, W)
    targets: torch.Tensor                 # (sum of lengths,) concatenated CTC targets
    lengths: torch.Tensor                 # (B,)
    texts: list
    ids: list
    audio: Optional[AudioBatch]           # readings, when the dataset has them (htr.audio.SpokenLines)


class Collate:
    """Batch items (image, text, id[, wave]) into a Batch."""

    def __init__(self, charset: Charset):
        self.charset = charset

    def __call__(self, batch) -> Batch:
        images, texts, ids, *waves = zip(*batch)
        encoded = [self.charset.encode(t) for t in texts]
        targets = torch.tensor([c for e in encoded for c in e], dtype=torch.long)
        lengths = torch.tensor([len(e) for e in encoded], dtype=torch.long)
        return Batch(torch.stack(images), targets, lengths, list(texts), list(ids),
                     AudioBatch.of(waves[0]) if waves else None)

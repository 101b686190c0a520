"""The synthetic dataset writer behind prepare_synthetic.py: which lines go where (a flat folder per split, or
shards of a fixed number of lines), rendering them in a process pool, resuming a sharded set, its settings and the
summary, and the preview grid. Every line is seeded by (seed, split, index) alone, so a line is the same whatever
the worker count, the shard size or the run that wrote it.
"""
import json
import time
from dataclasses import dataclass, replace
from functools import cache, partial
from multiprocessing import Pool
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from htr.synth_glyphs import DIGITS, fetch_all, licence_record, mnist
from htr.synthetic import MNIST_PART, SPLITS, on_paper, render_line, sample_style, sample_text, split_speeches
from htr.synthetic_letters import LETTERS, abbreviate
from utils import UserError, atomic_write, remove_stale_temp_files

STYLES = ("iam", "letters")  # iam: the quick start's lines; letters: htr/synthetic_letters.py
SETTINGS = "synthetic.json"  # a sharded set's settings and last summary, beside its splits
PNG_FAST = [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_HUFFMAN_ONLY,
            cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_SUB]  # noisy images: 3x faster, about as small


# ---------------------------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class Part:
    """Lines start..stop-1 of a split, written into one folder with its own gt.txt: the split folder itself (flat
    layout) or one shard."""
    split: str
    folder: Path
    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start

    @property
    def complete(self) -> bool:
        return (self.folder / "gt.txt").is_file()  # written last, atomically


def layout(out_dir: Path, n_lines: int, shard_size: int | None) -> list[Part]:
    """The parts of every split: 80/10/10 % of n_lines, in shards of shard_size lines (None: one flat folder)."""
    parts = []
    for split, fraction in SPLITS.items():
        n = round(n_lines * fraction)
        if not shard_size:
            parts.append(Part(split, out_dir / split, 0, n))
            continue
        parts += [Part(split, out_dir / split / f"shard-{k:05d}", start, min(start + shard_size, n))
                  for k, start in enumerate(range(0, n, shard_size))]
    return parts


# ---------------------------------------------------------------------------------------------- lines
@cache
def split_words(split: str) -> list[str]:
    """The split's running text (~1 s to parse: once per process)."""
    return [w for speech in split_speeches(split) for w in speech]


def line_text(split: str, index: int, seed: int, style: str) -> str:
    rng = np.random.default_rng([seed, list(SPLITS).index(split), index, 0])
    if style == "letters":
        return abbreviate(sample_text(split_words(split), rng, LETTERS["length"]), rng)
    return sample_text(split_words(split), rng)


def make_line(job: tuple[str, int, str], seed: int, style: str) -> tuple[str, str]:
    """Render and write line `index` of a split into `folder`; returns its gt.txt and styles.txt rows."""
    split, index, folder = job
    line_id, text = f"synth-{split}-{index:06d}", line_text(split, index, seed, style)
    rng = np.random.default_rng([seed, list(SPLITS).index(split), index, 1])
    hand = replace(sample_style(split, rng), letters=style == "letters")
    cv2.imwrite(str(Path(folder) / f"{line_id}.png"), on_paper(render_line(text, hand, rng), rng, seed), PNG_FAST)
    font = f"mnist-{hand.mnist}+{hand.font}" if hand.mnist and any(c in DIGITS for c in text) else hand.font
    return (f"{line_id} {text}\n", f"{line_id} {hand.source} {font} {hand.size:.1f} {hand.pen} {hand.slant:.2f} "
                                   f"{hand.stretch:.2f} {hand.wobble:.2f} {hand.weight}\n")


def finish(part: Part, rows: list[tuple[str, str]]) -> None:
    """styles.txt, then gt.txt: a part is complete once its gt.txt exists."""
    for name, column in (("styles.txt", 1), ("gt.txt", 0)):
        with atomic_write(part.folder / name, "w") as f:
            f.write("".join(row[column] for row in rows))


def write_parts(todo: list[Part], seed: int, style: str, workers: int) -> None:
    """Render the parts' lines in a pool, in order, finishing each part as soon as its last line is written."""
    for part in todo:
        part.folder.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_files(part.folder)                                # of a killed run
    jobs = ((p.split, i, str(p.folder)) for p in todo for i in range(p.start, p.stop))
    with Pool(workers) as pool, tqdm(total=sum(map(len, todo)), desc="lines") as bar:
        rows = pool.imap(partial(make_line, seed=seed, style=style), jobs, chunksize=32)
        for part in todo:
            finish(part, [next(rows) for _ in range(len(part))])
            bar.update(len(part))


# ---------------------------------------------------------------------------------------------- settings
def check_settings(out_dir: Path, settings: dict) -> None:
    """Refuse to write into a set made with other settings: its shards would be skipped as complete and mixed."""
    path = out_dir / SETTINGS
    if path.is_file():
        try:
            old = json.loads(path.read_text())["settings"]
        except (ValueError, KeyError) as e:
            raise UserError(f"{path} is unreadable ({e}); delete it only if {out_dir} holds nothing you need")
        if old != settings:
            diff = ", ".join(f"{k} {old.get(k)} (now {v})" for k, v in settings.items() if old.get(k) != v)
            raise UserError(f"{out_dir} was written with other settings: {diff} (see {path}); rerun with the "
                            f"same arguments to resume it, or write to another folder")
    elif settings["shard_size"] and any((out_dir / s / "gt.txt").is_file() for s in SPLITS):
        raise UserError(f"{out_dir} holds a flat synthetic set (<split>/gt.txt); write the sharded set to another "
                        f"folder")


def save_settings(out_dir: Path, settings: dict, summary: dict | None) -> None:
    with atomic_write(out_dir / SETTINGS, "w") as f:
        f.write(json.dumps({"settings": settings, "summary": summary}, indent=1) + "\n")


def format_summary(s: dict) -> str:
    return (f"{s['lines_written']} lines written, {s['lines_skipped']} skipped (already complete), "
            f"{s['seconds']:.1f} s, {s['lines_per_s']:.1f} lines/s with {s['workers']} worker(s)")


# ---------------------------------------------------------------------------------------------- preview
def write_preview(parts: list[Part], path: Path, per_split: int = 4, width: int = 1200) -> None:
    """A grid of a few lines of every split (from its first part) in different hands, one under the other."""
    rows = []
    for split in SPLITS:
        folder = next((p.folder for p in parts if p.split == split and len(p)), None)
        if folder is None:
            continue
        hands = {}  # font -> first line id written in it
        for row in (folder / "styles.txt").read_text().splitlines():
            hands.setdefault(row.split()[2], row.split()[0])
        rows += [cv2.imread(str(folder / f"{i}.png"), cv2.IMREAD_GRAYSCALE) for i in list(hands.values())[:per_split]]
    rows = [cv2.resize(r, (int(r.shape[1] * 64 / r.shape[0]), 64), interpolation=cv2.INTER_AREA) for r in rows]
    w = min(max(r.shape[1] for r in rows), width)
    grid = np.vstack([cv2.copyMakeBorder(r[:, :w], 0, 6, 0, w - r[:, :w].shape[1], cv2.BORDER_CONSTANT, value=255)
                      for r in rows])
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), grid)


# ---------------------------------------------------------------------------------------------- the run
def prepare_assets() -> None:
    """Download what is missing, build the digit cache and parse the texts once, before the workers fork."""
    fetch_all()
    for split in SPLITS:
        mnist(MNIST_PART[split])
        split_words(split)                                    # inherited by the forked workers


def generate(out_dir: Path, n_lines: int = 6000, seed: int = 0, workers: int = 2, preview: Path | None = None,
             shard_size: int | None = None, style: str = "iam") -> dict:
    """Write the dataset (see prepare_synthetic.py); a sharded set skips its complete shards. Prints and returns the
    summary (a sharded set also keeps it in synthetic.json); with `preview`, a grid of samples to that PNG."""
    if shard_size is not None and shard_size < 1:
        raise UserError(f"--shard-size must be at least 1 (got {shard_size}); leave it out for the flat layout")
    started = time.perf_counter()
    settings = {"lines": n_lines, "seed": seed, "shard_size": shard_size, "style": style}
    check_settings(out_dir, settings)
    if shard_size:
        save_settings(out_dir, settings, None)                # first: a killed run's settings are known too
    parts = layout(out_dir, n_lines, shard_size)
    todo = [p for p in parts if not (shard_size and p.complete)]
    if todo:
        prepare_assets()
        write_parts(todo, seed, style, max(workers, 1))
    seconds = time.perf_counter() - started
    written = sum(map(len, todo))
    summary = {"lines_written": written, "lines_skipped": sum(map(len, parts)) - written,
               "seconds": round(seconds, 2), "lines_per_s": round(written / seconds, 2), "workers": max(workers, 1)}
    if shard_size:
        save_settings(out_dir, settings, summary)
    with atomic_write(out_dir / "summary.json", "w") as f:            # the assets' licences, for the model card
        f.write(json.dumps({"licence": licence_record()}, indent=1) + "\n")
    if preview:
        write_preview(parts, preview)
    print(format_summary(summary))
    return summary

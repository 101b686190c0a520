"""The speech track writer behind prepare_speech.py: a spoken reading `<id>.wav` of every line of a line dataset
(flat or sharded splits), beside its `<id>.png` or in a mirror of the layout, written in a process pool, atomically
and resumably, with a speech.json per folder of lines that records the settings and every reading (its text, style,
SNR, word spans and muted words). A line's reading is seeded by (seed, split, id) alone, so it is the same whatever
the worker count or the run that wrote it."""
import contextlib
import functools
import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import soundfile
from tqdm import tqdm

from dataset import read_gt, split_folders
from htr.audio import AUDIO_SUFFIXES
from htr.speech_synthesis import SAMPLE_RATE, VOICES, Espeak, ReadingStyle, read_aloud
from utils import UserError, atomic_write, remove_stale_temp_files

log = logging.getLogger("htr")

SPEECH_FILE = "speech.json"
VERSION = 1                 # of the synthesis: a change that alters the audio of the same settings bumps it
CHECKPOINT_LINES = 200      # speech.json is rewritten this often: a killed run redoes at most this many lines


@dataclass(frozen=True)
class Folder:
    """A folder of lines (a split folder or one shard: PNGs and gt.txt) and where its audio goes."""
    split: str
    lines: Path
    audio: Path

    @property
    def record(self) -> Path:
        return self.audio / SPEECH_FILE


def line_folders(data_root: Path, splits, out: Path | None) -> list[Folder]:
    """Every folder of lines of the splits; with `out`, audio goes to the same relative folder under it."""
    folders = []
    for split in splits:
        split_dir = data_root / split
        if not split_dir.is_dir():
            raise UserError(f"split folder not found: {split_dir}; choose the splits with --splits (e.g. "
                            f"--splits train,val)")
        folders += [Folder(split, f, out / f.relative_to(data_root) if out else f) for f in split_folders(split_dir)]
    return folders


def make_settings(voices, snr, mute_words: float, seed: int) -> dict:
    """The run's settings, checked: known voices, SNRs `clean` or dB, a muted fraction in [0, 1), seed >= 0."""
    def parse(value):
        try:
            return "clean" if str(value) == "clean" else float(value)
        except ValueError:
            raise UserError(f"--snr takes `clean` or a number of dB (e.g. --snr clean 20 5), got {value!r}") from None
    if not 0 <= mute_words < 1:
        raise UserError(f"--mute-words is the fraction of words to mute, in [0, 1), got {mute_words}")
    if seed < 0:
        raise UserError(f"--seed must be 0 or more, got {seed}")
    if not voices or not snr:
        raise UserError("give at least one voice (--voices) and one SNR (--snr)")
    engine = Espeak()
    for voice in voices:
        engine.check_voice(voice)
    return {"voices": list(voices), "snr": [parse(v) for v in snr], "mute_words": mute_words, "seed": seed,
            "version": VERSION}


def load_record(folder: Folder, settings: dict, force: bool) -> dict:
    """The readings a folder's speech.json holds (none with `force`); refuses other settings, and audio that
    prepare_speech.py did not write, unless `force`."""
    if not folder.record.is_file():
        foreign = [p.name for s in AUDIO_SUFFIXES for p in folder.audio.glob(f"*{s}")]
        if foreign and not force:
            raise UserError(f"{folder.audio} holds {len(foreign)} audio file(s) that prepare_speech.py did not "
                            f"write (no {SPEECH_FILE}), e.g. {foreign[0]}; write elsewhere with --out DIR, or add "
                            f"--force to overwrite them")
        return {}
    try:
        saved = json.loads(folder.record.read_text(encoding="utf-8"))
        old, lines = saved["settings"], saved["lines"]
    except (ValueError, KeyError, TypeError) as e:
        if force:
            return {}
        raise UserError(f"{folder.record} is unreadable ({e}); add --force to rewrite that folder's audio") from None
    if old != settings and not force:
        diff = ", ".join(f"{k} {old.get(k)} (now {v})" for k, v in settings.items() if old.get(k) != v)
        raise UserError(f"{folder.audio} holds speech written with other settings: {diff} (see {folder.record}). "
                        f"Rerun with the same arguments to resume it, write elsewhere with --out DIR, or add "
                        f"--force to replace it")
    return {} if old != settings else lines


def save_record(folder: Folder, settings: dict, lines: dict) -> None:
    """speech.json: the settings, then one line per reading (by id)."""
    rows = ",\n".join(f" {json.dumps(i)}: {json.dumps(lines[i], ensure_ascii=False)}" for i in sorted(lines))
    with atomic_write(folder.record, "w") as f:
        f.write(f'{{"settings": {json.dumps(settings)},\n "lines": {{\n{rows}}}}}\n')


# ------------------------------------------------------------------------------------------------- one line
def line_rngs(seed: int, split: str, line_id: str) -> dict:
    """Independent generators for a line's style, SNR, muted words and noise, from (seed, split, id) alone: the
    same line at another SNR keeps its voice, pauses and muted words."""
    digest = hashlib.sha256(f"{split}/{line_id}".encode()).digest()
    entropy = [seed] + [int.from_bytes(digest[k:k + 4], "little") for k in range(0, 16, 4)]
    streams = np.random.SeedSequence(entropy).spawn(4)
    return dict(zip(("style", "snr", "mute", "noise"), map(np.random.default_rng, streams)))


@functools.cache
def process_engine() -> Espeak:
    return Espeak()


def make_reading(job: tuple, settings: dict) -> tuple:
    """Synthesise and write one line's reading; (id, its record), the record None when espeak-ng spoke none of
    its words (nothing written)."""
    split, line_id, text, wav = job
    rng = line_rngs(settings["seed"], split, line_id)
    style = ReadingStyle.sample(rng["style"], settings["voices"], len(text.split()))
    snr = settings["snr"][rng["snr"].integers(len(settings["snr"]))]
    reading = read_aloud(process_engine(), text, style, None if snr == "clean" else snr, settings["mute_words"],
                         rng["mute"], rng["noise"])
    if all(w is None for w in reading.words):
        return line_id, None
    with atomic_write(wav) as f:
        soundfile.write(f, reading.audio, SAMPLE_RATE, subtype="PCM_16", format="WAV")
    return line_id, {"text": text, "seconds": round(len(reading.audio) / SAMPLE_RATE, 3), "snr": snr,
                     "words": reading.words, "muted": reading.muted, "style": asdict(style)}


# ------------------------------------------------------------------------------------------------- the run
def plan(folder: Folder, kept: dict) -> tuple:
    """(lines to write, readings kept, ids without an image): a line is complete when its wav exists and
    speech.json holds its reading of the same text."""
    entries, _ = read_gt(folder.lines)                        # malformed rows: the line datasets report them
    no_image = [i for i, _ in entries if not (folder.lines / f"{i}.png").is_file()]
    complete = {i: kept[i] for i, text in entries if i in kept and kept[i].get("text") == text
                and (folder.audio / f"{i}.wav").is_file()}
    todo = [(i, t) for i, t in entries if i not in complete and i not in no_image]
    return todo, complete, no_image


def write_folders(work: list, settings: dict, workers: int) -> list:
    """Synthesise the folders' lines in order (a pool with workers > 1), checkpointing each folder's speech.json;
    returns the ids of lines with nothing spoken."""
    jobs = ((f.split, i, text, str(f.audio / f"{i}.wav")) for f, todo, _ in work for i, text in todo)
    make = functools.partial(make_reading, settings=settings)
    unspoken = []
    with Pool(workers) if workers > 1 else contextlib.nullcontext() as pool, \
            tqdm(total=sum(len(todo) for _, todo, _ in work), desc="readings") as bar:
        results = pool.imap(make, jobs, chunksize=4) if pool else map(make, jobs)
        for folder, todo, lines in work:
            for n in range(1, len(todo) + 1):
                line_id, record = next(results)
                if record is None:
                    unspoken.append(line_id)
                else:
                    lines[line_id] = record
                if n % CHECKPOINT_LINES == 0 or n == len(todo):
                    save_record(folder, settings, lines)
                bar.update()
    return unspoken


def log_skip(what: str, items: list) -> None:
    log.warning("skipped %d %s: %s%s", len(items), what, ", ".join(items[:5]), " ..." if len(items) > 5 else "")


def write_speech(data_root, splits=("train", "val", "test"), voices=None, snr=("clean",), mute_words: float = 0.0,
                 workers: int = 1, seed: int = 0, out=None, force: bool = False) -> dict:
    """Write the readings (see prepare_speech.py); prints and returns the summary."""
    started = time.perf_counter()
    settings = make_settings(voices or VOICES, snr, mute_words, seed)
    data_root = Path(data_root)
    folders = line_folders(data_root, splits, Path(out) if out else None)
    records = [load_record(f, settings, force) for f in folders]          # all refusals before any writing
    work, skipped, no_image = [], 0, []
    for folder, kept in zip(folders, records):
        todo, complete, missing = plan(folder, kept)
        skipped, no_image = skipped + len(complete), no_image + [str(folder.lines / f"{i}.png") for i in missing]
        if todo or complete != kept:
            folder.audio.mkdir(parents=True, exist_ok=True)
            remove_stale_temp_files(folder.audio)                            # of a killed run
            save_record(folder, settings, complete)                         # first: a killed run's settings too
            work.append((folder, todo, complete))
    if no_image:
        log_skip("line(s) without an image, no audio written", no_image)
    unspoken = write_folders([w for w in work if w[1]], settings, max(workers, 1))
    if unspoken:
        log_skip("line(s) with nothing espeak-ng could say, no audio written", unspoken)
    seconds = time.perf_counter() - started
    written = sum(len(todo) for _, todo, _ in work) - len(unspoken)
    summary = {"lines_written": written, "lines_skipped": skipped, "lines_without_image": len(no_image),
               "lines_unspoken": len(unspoken), "seconds": round(seconds, 2),
               "lines_per_s": round(written / seconds, 2), "workers": max(workers, 1)}
    print(f"{written} readings written, {skipped} skipped (already complete), {len(no_image)} lines without an "
          f"image, {len(unspoken)} with nothing to say; {seconds:.1f} s, {summary['lines_per_s']:.1f} lines/s "
          f"with {summary['workers']} worker(s)")
    return summary

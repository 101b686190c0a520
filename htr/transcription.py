"""Transcribe PAGE / ALTO pages (with their images) and line images with a trained recognizer: worker processes
read and cut pages (htr/page_lines.py's LineCutter), the model runs full batches of lines gathered across files,
the workers decode and write the XML copies; line images go to a TSV. transcribe.py is the command (its docstring
describes inputs, outputs and settings).
"""
import json
import logging
import time
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from dataset import worker_count
from dataset import AudioBatch
from htr.audio import AudioError, find_reading, read_audio
from htr.decoding import char_confidences, decode_batch, line_confidence
from htr.evaluation import check_decode_mode, lm_file, load_lm
from htr.images import canvas, dark_on_light, fit_warning, read_image
from htr.inference import line_log_probs
from htr.onnx_runtime import load_recognizer
from htr.page_lines import IMAGE_EXTS, ImageFinder, LineCutter, PageProblem, find_image, hidden, image_roots, load_image
from htr.pagexml import PageXmlError, read_page, set_line_text, write_page
from utils import (UserError, atomic_write, autocast_dtype, mixed_precision, resolve_device, set_torch_threads,
                   to_plain, use_fixed_size_kernels)

log = logging.getLogger("htr")
TSV = "transcriptions.tsv"


@dataclass
class Context:
    """What every worker process needs, handed over once when it starts; it also decodes."""
    finders: list                 # [ImageFinder]; PageJob.finder indexes it
    height: int
    width: int
    chars: str                    # the recognizer's charset
    lm: object                    # decoding.CharNgramLM or None
    beam: dict | None             # decode.* options for beam search; None = greedy
    overwrite: bool
    audio: Path | None = None     # transcribe.py --audio: the folder of per-line readings

    def reading(self, prepared: "Prepared", line_id: str, page: str | None = None):
        """A line's reading from the --audio folder as (samples,) float32, or None: none there, or unusable (said
        among the warnings; the line is then read from its image alone)."""
        path = None if self.audio is None else find_reading(self.audio, line_id, page)
        if path is None:
            return None
        try:
            wave = read_audio(path)
        except AudioError as e:
            prepared.warnings.append(f"{e}; line {line_id} is read from its image alone")
            return None
        return wave

    def decode(self, log_probs: list) -> list:
        """Per line (T, K) log-probs or None -> (text, line confidence, word confidences or None) or None."""
        found = [lp for lp in log_probs if lp is not None]
        if self.beam is None:
            decoded = []
            for lp in found:
                chars = char_confidences(lp, self.chars)
                decoded.append(("".join(c for c, _ in chars), line_confidence(lp), word_confidences(chars)))
        else:
            nbest = decode_batch(found, self.chars, self.lm, self.beam)
            decoded = [(n[0][0] if n else "", line_confidence(lp), None) for n, lp in zip(nbest, found)]
        results = iter(decoded)
        return [None if lp is None else next(results) for lp in log_probs]


_CONTEXT: Context | None = None   # in a worker process


def init_worker(context: Context) -> None:
    global _CONTEXT
    _CONTEXT = context


def model_input(grey: np.ndarray, height: int, width: int) -> np.ndarray:
    """A grey line image (h, w) uint8 -> the model's canvas (height, width) uint8, as training prepares lines."""
    return canvas(dark_on_light(grey), height, width)


@dataclass
class Prepared:
    """A job's lines ready for the model: images[i] is line i's canvas (H, W) uint8, or None if it has none;
    images is None when the whole job failed (problems say why)."""
    job: object
    images: list | None
    notes: Counter = field(default_factory=Counter)        # fallbacks, by kind and reason
    problems: list = field(default_factory=list)           # [(kind, message)] of files left out
    warnings: list = field(default_factory=list)           # [message] about files transcribed all the same
    readings: list = field(default_factory=list)           # readings[i]: line i's audio (samples,) or None


def word_confidences(chars: list) -> list:
    """[(char, confidence)] of a greedy line -> the mean confidence of each whitespace-separated word."""
    words, current = [], []
    for char, conf in chars + [(" ", 0.0)]:
        if not char.isspace():
            current.append(conf)
        elif current:
            words.append(float(np.mean(current)))
            current = []
    return words


@dataclass
class PageJob:
    """A PAGE / ALTO file: its lines are cut from the page image, recognised, and written into a copy of it."""
    xml: Path
    out: Path
    finder: int

    files = 1                     # input files it stands for (the progress bar's unit)

    @property
    def label(self) -> str:
        return str(self.xml)

    def prepare(self) -> Prepared:
        page = read_page(self.xml)
        image, lines = load_image(page, find_image(page, _CONTEXT.finders[self.finder])[0])
        cutter, prepared = LineCutter.of_page(image, lines), Prepared(self, [])
        for line in lines:
            crop, fallback = cutter.crop(line)
            prepared.notes.update([fallback] if fallback else [])
            prepared.images.append(None if crop is None else model_input(crop, _CONTEXT.height, _CONTEXT.width))
            prepared.readings.append(_CONTEXT.reading(prepared, line.id, self.xml.stem))
        return prepared

    def finish(self, log_probs: list) -> dict:
        """Decode and write the page (read again: only the line images travelled) -> line counts, problems."""
        page, counts, problems = read_page(self.xml), Counter(), []
        for line, result in zip(page.lines, _CONTEXT.decode(log_probs)):
            if result is None:
                counts["no usable geometry"] += 1
                problems.append(("lines without usable geometry, left without text", f"{self.xml}: line {line.id}"))
            elif set_line_text(page, line, *result, overwrite=_CONTEXT.overwrite):
                counts["transcribed"] += 1
            else:
                counts["kept their text"] += 1
        with atomic_write(self.out) as f:
            write_page(page, f)
        return {"lines": counts, "problems": problems}


@dataclass
class LinesJob:
    """A few line images, transcribed into the TSV."""
    paths: list

    @property
    def files(self) -> int:
        return len(self.paths)

    @property
    def label(self) -> str:
        return str(self.paths[0]) + (f" (and {len(self.paths) - 1} more line images)" if len(self.paths) > 1 else "")

    def prepare(self) -> Prepared:
        ctx, prepared = _CONTEXT, Prepared(self, [])
        for path in self.paths:
            prepared.readings.append(_CONTEXT.reading(prepared, path.stem))
            try:
                grey = read_image(path)
            except ValueError as e:
                prepared.problems.append(("not a line image", f"{path}: {e}"))
                prepared.images.append(None)
                continue
            poor = fit_warning(*grey.shape, ctx.height, ctx.width)
            if poor:
                prepared.warnings.append(f"{path}: {poor}")
            prepared.images.append(canvas(grey, ctx.height, ctx.width))   # read_image: dark on light
        return prepared

    def finish(self, log_probs: list) -> dict:
        """-> rows (path, text, confidence) of the readable images."""
        return {"rows": [(str(path), result[0], result[1])
                         for path, result in zip(self.paths, _CONTEXT.decode(log_probs)) if result is not None]}


def run_prepare(job) -> Prepared:
    """job.prepare() in a worker; a page that cannot be read becomes a reported problem, never an exception."""
    try:
        return job.prepare()
    except (PageXmlError, PageProblem) as e:
        return Prepared(job, None, problems=[(e.kind, str(e))])
    except Exception as e:                             # a bad file never stops the run: report it, go on
        return Prepared(job, None, problems=[("error", f"{job.label}: {type(e).__name__}: {e}")])


def run_finish(job, log_probs: list) -> dict:
    """job.finish() in a worker; failures are reported problems, as in run_prepare."""
    try:
        return job.finish(log_probs)
    except OSError as e:
        return {"problems": [("cannot write", f"{job.label}: {e.strerror or e}")]}
    except Exception as e:
        return {"problems": [("error", f"{job.label}: {type(e).__name__}: {e}")]}


# ---------------------------------------------------------------------------------------------------- batches

@dataclass
class Waiting:
    """A prepared job in the Batcher: its lines' log-probs as they come, how many are still missing."""
    prepared: Prepared
    log_probs: list
    missing: int


class Batcher:
    """Runs the recognizer on full batches of lines gathered across jobs; returns the jobs whose lines are done."""

    def __init__(self, model, batch_size: int, autocast):
        self.model, self.batch_size, self.autocast = model, batch_size, autocast
        self.queue, self.waiting, self.seconds = [], [], 0.0     # queue: [(Waiting, line index, image, reading)]

    def add(self, prepared: Prepared) -> list:
        """Queue a job's lines, run every full batch -> [(prepared, log-probs)] of the jobs now complete."""
        state = Waiting(prepared, [None] * len(prepared.images), sum(img is not None for img in prepared.images))
        readings = prepared.readings or [None] * len(prepared.images)
        self.queue += [(state, k, img, wave) for k, (img, wave) in enumerate(zip(prepared.images, readings))
                       if img is not None]
        self.waiting.append(state)
        while len(self.queue) >= self.batch_size:
            self._run(self.batch_size)
        return self._done()

    def flush(self) -> list:
        """Run what is left (a last, smaller batch) -> the remaining jobs."""
        while self.queue:
            self._run(self.batch_size)
        return self._done()

    def _run(self, n: int) -> None:
        batch, self.queue = self.queue[:n], self.queue[n:]
        start = time.perf_counter()
        images = torch.from_numpy(np.stack([b[2] for b in batch])).unsqueeze(1).float().div_(255)  # (B, 1, H, W)
        waves = [b[3] for b in batch]
        audio = AudioBatch.of(waves) if any(w is not None for w in waves) else None
        for (state, k, *_), lp in zip(batch, line_log_probs(self.model, images, True, self.autocast, audio)):
            state.log_probs[k] = lp
            state.missing -= 1
        self.seconds += time.perf_counter() - start

    def _done(self) -> list:
        done = [s for s in self.waiting if s.missing == 0]
        self.waiting = [s for s in self.waiting if s.missing]
        return [(s.prepared, s.log_probs) for s in done]


def transcribe(jobs: list, context: Context, model, cfg, workers: int) -> tuple[list, list, float]:
    """Prepare jobs in `workers` processes (a bounded window ahead of the model), recognise their lines in batches,
    finish them in the same processes -> (prepared jobs, their finish results or None, model seconds)."""
    batcher = Batcher(model, cfg.eval.batch_size, autocast_dtype(cfg.eval.mixed_precision, resolve_device(cfg.device)))
    prepared_all, finishing = [], {}
    bar = tqdm(total=sum(j.files for j in jobs), desc="transcribing", unit="file")
    with ProcessPoolExecutor(workers, initializer=init_worker, initargs=(context,)) as pool:
        todo, ahead = deque(jobs), deque()

        def finish(prepared, log_probs):
            finishing[id(prepared)] = future = pool.submit(run_finish, prepared.job, log_probs)
            future.add_done_callback(lambda _: bar.update(prepared.job.files))

        try:
            while todo or ahead:
                while todo and len(ahead) < 2 * workers + 2:
                    ahead.append(pool.submit(run_prepare, todo.popleft()))
                prepared = ahead.popleft().result()
                prepared_all.append(prepared)
                for warning in prepared.warnings:
                    log.warning("%s", warning)
                if prepared.images is None:
                    bar.update(prepared.job.files)
                    continue
                for done in batcher.add(prepared):
                    finish(*done)
            for done in batcher.flush():
                finish(*done)
            results = [finishing[id(p)].result() if id(p) in finishing else None for p in prepared_all]
        except BrokenProcessPool:
            raise UserError("a worker process died (out of memory?): try a smaller eval.batch_size or fewer "
                            "eval.num_workers") from None
    bar.close()
    return prepared_all, results, batcher.seconds


# ---------------------------------------------------------------------------------------------------- inputs

def collect(inputs: list, out: Path, images: Path | None) -> tuple[list, list, list]:
    """Command-line inputs -> (page jobs, line image paths, image finders); UserError for a missing input or two
    pages that would be written to one file."""
    pages, lines, finders, roots = [], [], [], {}

    def finder(folder: Path) -> int:
        folder = folder.resolve()
        if folder not in roots:
            roots[folder] = len(finders)
            finders.append(ImageFinder(*image_roots(folder, images.resolve() if images else None)))
        return roots[folder]

    def found(folder: Path, suffixes) -> list:           # not hidden, not in the output folder
        return sorted(p for p in folder.rglob("*") if p.suffix.lower() in suffixes and not hidden(p, folder)
                      and not p.resolve().is_relative_to(out.resolve()))

    for arg in inputs:
        path = Path(arg)
        if path.is_dir():
            xmls = found(path, {".xml"})
            pages += [PageJob(x, out / x.relative_to(path), finder(path)) for x in xmls]
            lines += [] if xmls else found(path, IMAGE_EXTS)
        elif path.suffix.lower() == ".xml" and path.is_file():
            pages.append(PageJob(path, out / path.name, finder(path.parent)))
        elif path.is_file():
            lines.append(path)                         # read_image says if it is not an image
        else:
            raise UserError(f"input not found: {arg}")
    check_outputs(pages)
    return pages, lines, finders


def check_outputs(pages: list) -> None:
    """UserError if a page would be written over its input or over another page's output."""
    targets = {}
    for job in pages:
        if job.out.resolve() == job.xml.resolve():
            raise UserError(f"--out would overwrite the input {job.xml}: choose another output folder")
        other = targets.setdefault(job.out.resolve(), job.xml)
        if other != job.xml:
            raise UserError(f"{other} and {job.xml} would both be written to {job.out}: transcribe them separately")


def beam_options(cfg) -> dict | None:
    """decode.* for the beam search (None for greedy); what transcribe.py cannot do is a UserError."""
    check_decode_mode(cfg)
    if cfg.decode.tune or cfg.decode.llm_rescore:
        raise UserError("decode.tune and decode.llm_rescore need reference transcriptions: tune with evaluate.py, "
                        "then pass decode.lm_weight=... decode.lm_bonus=...")
    return to_plain(cfg.decode) if cfg.decode.mode == "beam" else None


# ---------------------------------------------------------------------------------------------------- summary

def summarize(prepared: list, results: list, seconds: float, model_seconds: float, settings: dict) -> dict:
    pages = [p for p in prepared if isinstance(p.job, PageJob)]
    written = [r for p, r in zip(prepared, results) if isinstance(p.job, PageJob) and r and "lines" in r]
    problems = {}
    for kind, message in [x for p in prepared for x in p.problems] + [x for r in results if r
                                                                        for x in r.get("problems", [])]:
        problems.setdefault(kind, []).append(message)
    rows = [row for r in results if r for row in r.get("rows", [])]
    lines = {k: sum(r["lines"][k] for r in written) for k in ("transcribed", "kept their text", "no usable geometry")}
    recognised = lines["transcribed"] + lines["kept their text"] + len(rows)
    return {
        "pages": {"written": len(written), "of": len(pages)},
        "lines": lines,
        "fallbacks": dict(sorted(sum((p.notes for p in pages), Counter()).items())),
        "line_images": {"transcribed": len(rows), "of": sum(len(p.job.paths) for p in prepared
                                                           if isinstance(p.job, LinesJob))},
        "lines_with_audio": sum(w is not None for p in prepared for w in p.readings),
        "problems": problems,
        "warnings": [w for p in prepared for w in p.warnings],
        "seconds": round(seconds, 2), "model_seconds": round(model_seconds, 2),
        "lines_per_second": round(recognised / seconds, 2) if seconds else None,
        "pages_per_minute": round(60 * len(written) / seconds, 2) if seconds else None,
        "settings": settings,
    }


def format_summary(s: dict) -> str:
    lines = s["lines"]
    out = [f"pages: {s['pages']['written']} of {s['pages']['of']} written; lines: {lines['transcribed']} "
           f"transcribed, {lines['kept their text']} kept their text"
           + (" (--overwrite replaces it)" if lines["kept their text"] else "")
           + f", {lines['no usable geometry']} without usable geometry",
           f"line images: {s['line_images']['transcribed']} of {s['line_images']['of']} transcribed",
           "fallbacks: " + (", ".join(f"{k}: {n}" for k, n in s["fallbacks"].items()) or "none")]
    if s["settings"]["audio"]:
        out.append(f"lines read with their audio from {s['settings']['audio']}: {s['lines_with_audio']}")
    for kind, items in s["problems"].items():
        out.append(f"{kind} ({len(items)}):" + "".join(f"\n  {i}" for i in items[:10])
                   + (f"\n  ... ({len(items) - 10} more in summary.json)" if len(items) > 10 else ""))
    if s["warnings"]:
        out.append(f"poor line images, transcribed all the same: {len(s['warnings'])} (listed in summary.json)")
    run = s["settings"]
    out.append(f"{s['seconds']:.1f} s ({s['model_seconds']:.1f} s in the model): {s['lines_per_second']} lines/s, "
               f"{s['pages_per_minute']} pages/min; {run['runtime']} on {run['device']} ({run['precision']}), "
               f"{run['decoding']} decoding, {run['threads']} model thread(s), {run['workers']} worker process(es)")
    return "\n".join(out)


def run_settings(cfg, device, beam: dict | None, lm, workers: int, flags) -> dict:
    """What the summary records about how the run transcribed."""
    onnx = cfg.runtime == "onnx"
    precision = mixed_precision(cfg.eval.mixed_precision, device, "eval.mixed_precision")
    return {"model": str(cfg.resume), "runtime": cfg.runtime, "device": "cpu" if onnx else device.type,
            "precision": "as exported" if onnx else "fp32" if precision == "no" else precision,
            "decoding": cfg.decode.mode, "beam": beam, "lm": str(lm_file(cfg, cfg.resume)) if lm else None,
            "workers": workers, "threads": torch.get_num_threads(), "batch_size": cfg.eval.batch_size,
            "overwrite": flags.overwrite, "audio": str(flags.audio) if flags.audio else None}


def write_tsv(path: Path, results: list) -> None:
    with atomic_write(path, "w") as f:
        f.write("path\ttext\tconfidence\n")
        for r in results:
            for file, text, conf in (r or {}).get("rows", []):
                f.write(f"{file}\t{text.replace(chr(9), ' ')}\t{conf:.4f}\n")


def run(cfg, flags, beam: dict | None, pages: list, line_paths: list, finders: list, workers: int) -> dict:
    """Load the model (and LM), transcribe, write the TSV and summary.json -> the summary."""
    device = resolve_device(cfg.device)
    use_fixed_size_kernels(device)
    model, charset = load_recognizer(cfg, cfg.resume, cfg.runtime, device, channels_last=True)
    lm = load_lm(cfg, charset, cfg.resume) if beam else None
    if flags.audio is not None and not getattr(model, "has_audio", False):
        raise UserError(f"--audio {flags.audio}: this model reads images only (trained without "
                        f"arch.audio.enabled=true{', or an ONNX export' if cfg.runtime == 'onnx' else ''})")
    context = Context(finders, cfg.preproc.image_height, cfg.preproc.image_width, charset.chars, lm, beam,
                      flags.overwrite, flags.audio)
    chunk = cfg.eval.batch_size
    jobs = pages + [LinesJob(line_paths[i:i + chunk]) for i in range(0, len(line_paths), chunk)]
    start = time.perf_counter()
    prepared, results, model_seconds = transcribe(jobs, context, model, cfg, workers)
    seconds = time.perf_counter() - start
    if line_paths:
        write_tsv(flags.out / TSV, results)
    settings = run_settings(cfg, device, beam, lm, workers, flags)
    summary = summarize(prepared, results, seconds, model_seconds, settings)
    (flags.out / "summary.json").write_text(json.dumps(summary, ensure_ascii=False, indent=1) + "\n",
                                            encoding="utf-8")
    return summary


def transcribe_inputs(cfg, inputs: list, flags) -> None:
    """transcribe.py's run on its parsed command line (see its parse_args): collect the inputs, transcribe them into
    flags.out, print the summary."""
    beam = beam_options(cfg)
    pages, line_paths, finders = collect(inputs, flags.out, flags.images)
    if not pages and not line_paths:
        raise UserError(f"no PAGE/ALTO files or line images in {', '.join(inputs)}")
    try:
        flags.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create --out {flags.out}: {e.strerror or e}") from None
    workers, threads = max(1, worker_count(cfg.eval.num_workers, "eval.num_workers")), torch.get_num_threads()
    # The model gets the CPUs the workers leave (onnxruntime takes torch's count): on 2 busy CPUs, 1 worker and 2
    # model threads made PyTorch 15-30x slower than 1 thread (docs/transcription.md).
    set_torch_threads(cfg.eval.num_threads, workers, "eval.num_threads")
    try:
        summary = run(cfg, flags, beam, pages, line_paths, finders, workers)
    finally:
        torch.set_num_threads(threads)
    print(format_summary(summary))

"""Evaluation of a checkpoint on a line dataset (the library behind evaluate.py): greedy CTC decoding, optionally CTC
prefix beam search with a character n-gram LM (built, loaded, tuned on val) and LLM rescoring; the report
(eval_<data>_<split>.json) and the per-line CSV written next to the checkpoint (output_dir)."""
import csv
import json
import logging
import re
from pathlib import Path

import torch
from rapidfuzz.distance import Levenshtein
from torch.utils.data import Subset

from dataset import LineDataset, line_loader, page_of, pages_drawn, read_gt, split_folders, worker_count
from htr.audio import open_split
from htr.audio_model import MODES
from htr.inference import predict
from htr.metrics import error_rates
from htr.model_folder import LM
from htr.onnx_runtime import load_recognizer
from utils import (UserError, autocast_dtype, normalize_text, resolve_device, set_torch_threads, to_plain,
                   use_fixed_size_kernels)

log = logging.getLogger("htr")
TUNE_WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5)
TUNE_BONUSES = (-0.5, 0.0, 0.5, 1.0, 2.0)


def line_rows(out: dict, hyp_key: str) -> list:
    """Per-line rows sorted worst first (by character errors, then CER)."""
    rows = []
    for i, ref, hyp, conf in zip(out["ids"], out["refs"], out[hyp_key], out["confidences"]):
        errors = Levenshtein.distance(ref, hyp)
        rows.append({"id": i, "errors": errors, "cer": errors / max(len(ref), 1), "confidence": round(conf, 4),
                     "reference": ref, "hypothesis": hyp})
    return sorted(rows, key=lambda r: (-r["errors"], -r["cer"]))


def confidence_check(rows: list) -> dict:
    """Does low confidence predict errors? CER of the least confident tenth of the lines vs the rest."""
    ranked = sorted(rows, key=lambda r: r["confidence"])
    cut = max(1, len(ranked) // 10)

    def cer(part):
        return sum(r["errors"] for r in part) / max(1, sum(len(r["reference"]) for r in part))
    return {"cer_lowest_confidence_decile": cer(ranked[:cut]), "cer_other_lines": cer(ranked[cut:])}


# ---------------------------------------------------------------------------------------------------- beam search

def output_dir(checkpoint) -> Path:
    """Where a model's reports and LM go: beside a checkpoint file, inside a model folder, and for a Hub id (which
    lives in huggingface_hub's cache) in ./<owner>--<name>/."""
    path = Path(str(checkpoint))
    if path.is_dir():
        return path
    if path.exists():
        return path.parent
    hub = Path(str(checkpoint).replace("/", "--"))
    hub.mkdir(exist_ok=True)
    return hub


def lm_file(cfg, checkpoint) -> Path:
    return Path(cfg.decode.lm_path) if cfg.decode.lm_path else output_dir(checkpoint) / LM


def build_lm(cfg, charset, path: Path):
    """Estimate the character LM from data.path/train transcriptions (those of data.train_fraction's pages, as
    the recognizer saw them) (+ decode.lm_text) and save it."""
    from htr.decoding import CharNgramLM
    entries = [e for folder in split_folders(Path(cfg.data.path) / "train") for e in read_gt(folder)[0]]   # shards too
    if cfg.data.train_fraction < 1:
        pages = pages_drawn([i for i, _ in entries], cfg.data.train_fraction, cfg.seed)
        entries = [(i, text) for i, text in entries if page_of(i) in pages]
    if cfg.decode.lm_text and not Path(cfg.decode.lm_text).is_file():
        raise UserError(f"decode.lm_text {cfg.decode.lm_text} not found")
    lm = CharNgramLM(charset, order=cfg.decode.lm_order)
    unknown = lm.fit([text for _, text in entries], cfg.decode.lm_text or None)
    lm.save(path)
    log.info("character %d-gram LM from %d lines saved to %s (%d out-of-charset characters cut the lines)",
             cfg.decode.lm_order, len(entries), path, unknown)
    return lm


def lm_text_overlap(text_file, held_out: dict) -> dict:
    """
    How many lines of each held-out split (name -> reference transcriptions) occur verbatim (NFC, stripped) in
    the LM text file, with a warning per split that has any: an LM trained on those lines has seen the answers
    (IAM's texts come from the LOB corpus, so an LOB-trained LM leaks IAM's test lines). Counts split lines,
    not LM text lines, so the number reads as "this many evaluated lines were leaked".
    """
    with open(text_file, encoding="utf-8") as f:
        lm_lines = {normalize_text(line.strip()) for line in f}
    overlap = {}
    for split, refs in held_out.items():
        leaked = [ref for ref in refs if ref in lm_lines]                  # refs: NFC and stripped by read_gt
        overlap[split] = len(leaked)
        if leaked:
            log.warning("%d of the %d %s lines occur verbatim in decode.lm_text %s: the LM has seen them, so "
                        "results on %s are optimistic (e.g. %s)", len(leaked), len(refs), split, text_file, split,
                        ", ".join(repr(r) for r in leaked[:3]))
    return overlap


def load_lm(cfg, charset, checkpoint):
    from htr.decoding import CharNgramLM
    path = lm_file(cfg, checkpoint)
    if cfg.decode.build_lm:
        return build_lm(cfg, charset, path)
    if cfg.decode.lm_weight == 0 and not cfg.decode.tune:
        return None
    if not path.is_file():
        raise UserError(f"no character LM at {path}: add decode.build_lm=true to estimate it from the training "
                        f"transcriptions, or set decode.lm_path")
    try:
        return CharNgramLM.load(path, charset.chars)
    except ValueError as e:
        raise UserError(str(e)) from None


def tune(cfg, charset, lm, val: dict) -> dict:
    """Grid-search lm_weight / lm_bonus on the val split; returns the best and the grid."""
    from htr.decoding import tune_lm_weights
    w, b, table = tune_lm_weights(val["log_probs"], val["refs"], charset, lm, TUNE_WEIGHTS, TUNE_BONUSES,
                                  cfg.decode, cfg.decode.workers)
    for row in table:
        log.info("tune on val: lm_weight %.2f lm_bonus %.2f -> CER %.4f", row["lm_weight"], row["lm_bonus"],
                 row["cer"])
    log.info("best on val: decode.lm_weight=%s decode.lm_bonus=%s", w, b)
    return {"lm_weight": w, "lm_bonus": b, "val_tuning": table}


def beam_decode(cfg, model, charset, out: dict, checkpoint) -> dict:
    """Adds out['beam'] (1-best of the beam search; out['llm'] after LLM rescoring) and returns the settings."""
    from htr.decoding import decode_batch
    lm = load_lm(cfg, charset, checkpoint)
    settings = {k: cfg.decode[k] for k in ("beam", "lm_weight", "lm_bonus", "prune_topk", "prune_threshold",
                                           "blank_skip", "beam_threshold")}
    val = infer(cfg, model, make_loader(cfg, "val", charset), charset) \
        if cfg.decode.tune or cfg.decode.llm_rescore else None
    if cfg.decode.build_lm and cfg.decode.lm_text:
        held_out = {cfg.eval.split: out["refs"], **({"val": val["refs"]} if cfg.decode.tune else {})}
        settings["lm_text_overlap"] = lm_text_overlap(cfg.decode.lm_text, held_out)
    if cfg.decode.tune:
        settings.update(tune(cfg, charset, lm, val))

    def nbest_of(log_probs):
        return decode_batch(log_probs, charset, lm if settings["lm_weight"] else None, settings, cfg.decode.workers)
    nbest = nbest_of(out["log_probs"])
    out["beam"] = [n[0][0] if n else "" for n in nbest]
    if cfg.decode.llm_rescore:
        from htr.rescore import llm_rescore
        k = cfg.decode.nbest
        out["llm"], settings["llm_rescore"] = llm_rescore(
            cfg, [n[:k] for n in nbest], [n[:k] for n in nbest_of(val["log_probs"])], val["refs"],
            resolve_device(cfg.device))
    return {**settings, "lm": str(lm_file(cfg, checkpoint)) if lm else None}


# ----------------------------------------------------------------------------------------------------- evaluation

def unknown_chars(data: LineDataset, charset) -> str:
    return "".join(sorted(set().union(*(charset.unknown(t) for t in data.texts))))


def make_loader(cfg, split: str, charset):
    data = open_split(cfg, split)
    unknown = unknown_chars(data, charset)
    if unknown:
        log.warning("%d character(s) of %s/%s are not in the model's charset and count as errors: %r",
                    len(unknown), cfg.data.path, split, unknown)
    return line_loader(data, charset, batch_size=cfg.eval.batch_size,
                       workers=worker_count(cfg.eval.num_workers, "eval.num_workers"))


def infer(cfg, model, loader, charset, modality: str = "both") -> dict:
    """predict() as evaluation runs it: channels_last, autocast per eval.mixed_precision (PyTorch runtime)."""
    return predict(model, loader, charset, channels_last=True,
                   autocast_dtype=autocast_dtype(cfg.eval.mixed_precision, resolve_device(cfg.device)),
                   modality=modality)


def modality_report(cfg, model, data, charset) -> dict:
    """The audio branch's comparison: greedy CER/WER of the lines that have a reading, read from the image alone,
    the reading alone and both ({} for a model or data without audio)."""
    if not (getattr(model, "has_audio", False) and getattr(data, "audio", None)):
        return {}
    spoken = Subset(data, [k for k, i in enumerate(data.ids) if i in data.audio])
    loader = line_loader(spoken, charset, batch_size=cfg.eval.batch_size,
                         workers=worker_count(cfg.eval.num_workers, "eval.num_workers"))
    report = {"lines": len(spoken)}
    for mode in MODES:
        out = infer(cfg, model, loader, charset, mode)
        report[mode] = error_rates(out["refs"], out["hyps"], cfg.eval.wer_mode)
        log.info("%d lines with a reading, read from %s: CER %.4f WER %.4f", len(spoken),
                 {"both": "image + audio"}.get(mode, f"the {mode} alone"), report[mode]["cer"], report[mode]["wer"])
    return report


def data_name(path) -> str:
    """A dataset's name in report file names: the last two components of its resolved path, joined and sanitised
    (./data/IAM/processed_lines -> IAM_processed_lines)."""
    name = "_".join(Path(path).resolve().parts[-2:])
    return re.sub(r"[^A-Za-z0-9.-]+", "_", name).strip("_") or "data"


def model_info(cfg, checkpoint, charset) -> dict:
    """What the report says about the model: file, charset size, line size, architecture (PyTorch runtime), the
    training epoch and step of a trainer.py checkpoint (read memory-mapped) and the run's config.yaml if beside it."""
    path = Path(checkpoint)
    info = {"path": str(path.resolve()), "charset_size": len(charset.chars), "preproc": to_plain(cfg.preproc)}
    if cfg.runtime == "torch":
        info["arch"] = to_plain(cfg.arch)
    if path.is_file() and path.suffix == ".pt":
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        info.update({k: ckpt[k] for k in ("epoch", "step") if k in ckpt})
    run_config = (path if path.is_dir() else path.parent) / "config.yaml"
    if run_config.is_file():
        info["run_config"] = str(run_config.resolve())
    return info


def check_decode_mode(cfg) -> None:
    if cfg.decode.mode not in ("greedy", "beam"):
        raise UserError(f"decode.mode must be greedy or beam, got {cfg.decode.mode!r}")


def evaluate(cfg, checkpoint) -> dict:
    check_decode_mode(cfg)
    if cfg.decode.llm_rescore and cfg.decode.mode != "beam":
        raise UserError("decode.llm_rescore=true rescores beam-search n-best lists: add decode.mode=beam")
    device = resolve_device(cfg.device)
    use_fixed_size_kernels(device)
    if device.type == "cpu":                                  # before onnxruntime takes torch's thread count
        set_torch_threads(cfg.eval.num_threads, worker_count(cfg.eval.num_workers, "eval.num_workers"),
                          "eval.num_threads")
    model, charset = load_recognizer(cfg, checkpoint, cfg.runtime, device, channels_last=True)
    loader = make_loader(cfg, cfg.eval.split, charset)
    out = infer(cfg, model, loader, charset)
    out["greedy"] = out.pop("hyps")
    data = loader.dataset
    report = {"checkpoint": str(checkpoint), "data": str(cfg.data.path),
              "data_path": str(Path(cfg.data.path).resolve()), "data_name": data_name(cfg.data.path),
              "split": cfg.eval.split, "runtime": cfg.runtime,
              "decode": to_plain(cfg.decode) if cfg.decode.mode == "beam" else {"mode": "greedy"},
              "model": model_info(cfg, checkpoint, charset), "lines": len(data), "skipped": len(data.skipped),
              "unknown_chars": unknown_chars(data, charset)}
    if cfg.decode.mode == "beam":
        report["beam_settings"] = beam_decode(cfg, model, charset, out, checkpoint)
    modalities = modality_report(cfg, model, data, charset)
    if modalities:
        report["modalities"] = modalities
    modes = [m for m in ("greedy", "beam", "llm") if m in out]
    for mode in modes:
        report[mode] = error_rates(out["refs"], out[mode], cfg.eval.wer_mode)
    best = modes[-1]
    report.update(decoding=best, cer=report[best]["cer"], wer=report[best]["wer"])
    rows = line_rows(out, best)
    report["confidence"] = confidence_check(rows)
    write_outputs(output_dir(checkpoint), f"eval_{report['data_name']}_{cfg.eval.split}", report, rows)
    return report


def write_outputs(out_dir: Path, name: str, report: dict, rows: list) -> None:
    """out_dir/name.json (the report) and out_dir/name.csv (the lines)."""
    json_path, csv_path = out_dir / f"{name}.json", out_dir / f"{name}.csv"
    json_path.write_text(json.dumps(report, indent=2, ensure_ascii=False, default=float))
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    log.info("wrote %s and %s", json_path, csv_path)

"""Evaluate a checkpoint: python evaluate.py config.yaml resume=run/best.pt [eval.split=test] [data.path=...]

Greedy CTC decoding; corpus CER and WER; writes eval_<split>.json (report) and eval_<split>.csv (lines, worst
first) next to the checkpoint.
"""
import csv
import json
import logging
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from dataset import Collate, LineDataset
from utils import (UserError, error_rates, load_config, load_model, predict, resolve_device, run_main,
                   split_cli)

log = logging.getLogger("htr")


def line_rows(out: dict) -> list:
    """Per-line rows sorted worst first (by character errors, then CER)."""
    from rapidfuzz.distance import Levenshtein
    rows = []
    for i, ref, hyp, conf in zip(out["ids"], out["refs"], out["hyps"], out["confidences"]):
        errors = Levenshtein.distance(ref, hyp)
        rows.append({"id": i, "errors": errors, "cer": errors / max(len(ref), 1), "confidence": round(conf, 4),
                     "reference": ref, "hypothesis": hyp})
    return sorted(rows, key=lambda r: (-r["errors"], -r["cer"]))


def evaluate(cfg, checkpoint) -> dict:
    device = resolve_device(cfg.device)
    model, charset, _ = load_model(cfg, checkpoint)
    model = model.to(device).to(memory_format=torch.channels_last)
    data = LineDataset(cfg.data.path, cfg.eval.split, cfg.preproc.image_height, cfg.preproc.image_width,
                       cfg.data.cache)
    unknown = sorted(set().union(*(charset.unknown(t) for t in data.texts)))
    if unknown:
        log.warning("%d character(s) of %s/%s are not in the model's charset and count as errors: %r",
                    len(unknown), cfg.data.path, cfg.eval.split, "".join(unknown))
    loader = DataLoader(data, batch_size=cfg.eval.batch_size, num_workers=cfg.eval.num_workers,
                        collate_fn=Collate(charset))
    out = predict(model, loader, charset, device, channels_last=True)
    metrics = error_rates(out["refs"], out["hyps"], cfg.eval.wer_mode)
    report = {"checkpoint": str(checkpoint), "data": str(cfg.data.path), "split": cfg.eval.split,
              "lines": len(data), "skipped": len(data.skipped), "unknown_chars": "".join(unknown),
              "decoding": "greedy", **metrics}
    write_outputs(Path(checkpoint).parent, cfg.eval.split, report, line_rows(out))
    return report


def write_outputs(out_dir: Path, split: str, report: dict, rows: list) -> None:
    (out_dir / f"eval_{split}.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
    with open(out_dir / f"eval_{split}.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    log.info("wrote %s and %s", out_dir / f"eval_{split}.json", out_dir / f"eval_{split}.csv")


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    cfg_path, overrides, extra = split_cli(sys.argv[1:] if argv is None else argv)
    if extra:
        raise UserError(f"unexpected arguments {extra}; evaluate.py takes config.yaml and key=value overrides")
    cfg = load_config(cfg_path, overrides)
    if not cfg.resume:
        raise UserError("no checkpoint given: add resume=PATH/TO/best.pt")
    report = evaluate(cfg, cfg.resume)
    print(f"{report['split']}: CER {100 * report['cer']:.2f}%  WER {100 * report['wer']:.2f}%  "
          f"({report['lines']} lines, {report['skipped']} skipped)")


if __name__ == "__main__":
    run_main(main)

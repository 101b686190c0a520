"""Model folders (the library behind export.py export.format=folder): safetensors weights, config.yaml, charset.txt,
the run's LM if it has one (htr/model_folder.py writes them) and a model card README.md, which `hf upload USER/NAME
OUT_DIR` publishes as it is.
"""
import copy
import json
import logging
from pathlib import Path

import torch

from htr.corpus_licence import UNKNOWN
from htr.decoding import CharNgramLM
from htr.evaluation import lm_file
from htr.inference import load_model, max_diff
from htr.model_folder import CARD, CHARSET, CONFIG, LM, WEIGHTS, save_model_folder
from htr.training_data import KEY as TRAINING_DATA, recorded_stages
from models import HTRNet, parameter_report
from utils import Charset, UserError, read_json, to_plain

log = logging.getLogger("htr")

TAGS = ["handwritten-text-recognition", "htr", "ocr", "ctc", "image-to-text"]


def folder_config(cfg, ckpt: dict) -> dict:
    """config.yaml of a model folder: the checkpoint's arch and preproc; the exporter's eval and decode defaults
    without this machine's paths (decode.lm_path, decode.lm_text) or one-off actions (build_lm, tune)."""
    decode = {**to_plain(cfg.decode), "lm_path": None, "lm_text": None, "build_lm": False, "tune": False}
    return {"arch": ckpt["arch"], "preproc": ckpt["preproc"], "eval": to_plain(cfg.eval), "decode": decode,
            TRAINING_DATA: recorded_stages(ckpt, cfg.resume)}


def checkpoint_lm(cfg, checkpoint: Path, charset: Charset) -> Path | None:
    """The run's character LM (decode.lm_path, else char_lm.json.gz beside the checkpoint) if there is one,
    checked against the charset."""
    path = lm_file(cfg, checkpoint)
    if not path.is_file():
        if cfg.decode.lm_path:
            raise UserError(f"decode.lm_path {path} not found")
        return None
    try:
        CharNgramLM.load(path, charset.chars)
    except ValueError as e:
        raise UserError(str(e)) from None
    return path


def eval_reports(checkpoint: Path) -> list:
    """evaluate.py's reports (eval_*.json) beside the checkpoint that were made with it (same file name)."""
    reports = []
    for path in sorted(checkpoint.parent.glob("eval_*.json")):
        report = read_json(path)
        if "cer" in report and Path(str(report.get("checkpoint"))).name == checkpoint.name:
            reports.append(report)
        elif report:
            log.info("%s left out of the model card: made with %s", path.name, report.get("checkpoint"))
    return reports


def metrics_section(reports: list) -> str:
    if not reports:
        return ("No evaluation report was beside the checkpoint at export time: measure with `python evaluate.py "
                "config.yaml resume=FOLDER data.path=DIR eval.split=test`.\n")
    rows = ["| data | split | lines | decoding | CER | WER |", "|---|---|---|---|---|---|"]
    for r in reports:
        rows += [f"| `{r.get('data')}` | {r.get('split')} | {r.get('lines')} | {mode} | {100 * r[mode]['cer']:.2f} % "
                 f"| {100 * r[mode]['wer']:.2f} % |" for mode in ("greedy", "beam", "llm") if mode in r]
    return "\n".join(rows) + "\n\nCER and WER are corpus rates (edits / reference length) from `evaluate.py`.\n"


def data_licence_line(record: dict | None) -> str:
    """The training lines' licence as prepare_pages.py or prepare_synthetic.py recorded it (a stage's licence)."""
    if record is None:
        return "not recorded (the lines were not written by prepare_pages.py or prepare_synthetic.py)"
    if record["licence"] == UNKNOWN:
        return "unknown (prepare_pages.py found none and none was given): ask the data's owner before reusing the model"
    unknown = ": some lines' licence is unknown, ask their owner before reusing the model" \
        if UNKNOWN in record["licence"].split(" AND ") else ""
    return f"`{record['licence']}` (from `{record['found_in']}`){unknown}"


def stages_table(stages: list) -> str:
    """The training data, one row per stage (htr/training_data.py), the first model's data first."""
    if not stages:
        return "The training data was not recorded (a model exported before the record was kept).\n"
    rows = ["| stage | run | `data.path` (on the training machine) | train lines | licence of the lines |",
            "|---|---|---|---|---|"]
    rows += [f"| {k} | `{st.get('run')}` | `{st.get('data')}` | {st.get('train_lines') or 'not recorded'} | "
             f"{data_licence_line(st.get('licence'))} |" for k, st in enumerate(stages, 1)]
    return "\n".join(rows) + ("\n\nEach stage started from the model of the stage before (`train.init_from`).\n"
                              if len(stages) > 1 else "\n")


def license_section(license_id: str) -> str:
    if license_id != "other":
        return f"`{license_id}` (set by the exporter, `export.license`).\n"
    return ("`other`: the exporter chose no licence (`export.license=other`, the default); ask the author before "
            "reusing the model, and export with e.g. `export.license=apache-2.0` to set one. The terms of the training "
            "data apply as well (IAM, for one, is for non-commercial research only).\n")


def model_card(cfg, ckpt: dict, checkpoint: Path, charset: Charset, has_lm: bool) -> str:
    """README.md of a model folder: YAML front matter the Hub reads, then what the model is, was trained on, scores
    and how to run it."""
    from huggingface_hub import ModelCardData
    meta = ModelCardData(license=cfg.export.license, library_name="pytorch", tags=TAGS,
                         pipeline_tag="image-to-text", metrics=["cer", "wer"])
    params = parameter_report(HTRNet(cfg.arch, len(charset)))
    info = read_json(checkpoint.parent / "run_info.json")
    h, w = ckpt["preproc"]["image_height"], ckpt["preproc"]["image_width"]
    lm_row = f"| `{LM}` | character n-gram LM for `decode.mode=beam` |\n" if has_lm else ""
    return f"""---
{meta.to_yaml()}
---

# {checkpoint.parent.name}: handwritten text line recognizer

A CTC recognizer of handwritten text lines: a hybrid CNN/MobileViT backbone and a CTCtopB head (BiLSTM + 1x3
convolution shortcut), from the run `{checkpoint.parent.name}` (`{checkpoint.name}`). It reads one line image (any
size, scaled into a {h}x{w} grey canvas) and outputs its transcription (greedy CTC decoding; beam search with a
character LM where `{LM}` is present).

| file | content |
|---|---|
| `{WEIGHTS}` | the weights (safetensors, no pickle; the state_dict as trained, BatchNorm not folded) |
| `{CONFIG}` | `arch` and `preproc`, used in place of the user's config; `eval` and `decode` defaults |
| `{CHARSET}` | the {len(charset.chars)} characters in class order, class 0 being the CTC blank (UTF-8, no separator) |
{lm_row}
## Parameters

backbone {params['backbone']:,}, head {params['head']:,}, total {params['total']:,} (no LLM: it serves training only).

## Training data

{stages_table(recorded_stages(ckpt, checkpoint))}
- validation (the last stage): {info.get('val_lines', 'not recorded')} lines
- charset: {len(charset.chars)} characters

```text
{json.dumps(charset.chars, ensure_ascii=False)}
```

## Metrics

{metrics_section(eval_reports(checkpoint))}
## License

{license_section(cfg.export.license)}
## How to use

With the project's code (`make install`), `resume=` takes this folder, or its Hub id once uploaded
(`hf upload USER/NAME FOLDER`); the folder brings its own architecture, so the stock `config.yaml` does:

```bash
python demo.py config.yaml resume=FOLDER line.png                        # transcription and confidence
python evaluate.py config.yaml resume=FOLDER data.path=DIR eval.split=test  # CER / WER on a line dataset
python serve.py config.yaml resume=FOLDER                                 # web page on http://127.0.0.1:7860
python demo.py config.yaml resume=USER/NAME line.png                     # from the Hub (cached)
```

`transcribe.py` (pages with their PAGE or ALTO XML) takes `resume=` the same way.
"""


def export_folder(cfg, model, charset: Charset, ckpt: dict, out_dir: Path) -> str:
    """Write the model folder and reload it: the reloaded model must give the checkpoint's log-probs."""
    checkpoint = Path(cfg.resume)
    lm = checkpoint_lm(cfg, checkpoint, charset)
    save_model_folder(out_dir, ckpt["model"], charset.chars, folder_config(cfg, ckpt), lm)
    (out_dir / CARD).write_text(model_card(cfg, ckpt, checkpoint, charset, lm is not None), encoding="utf-8")
    reloaded, _, _ = load_model(copy.deepcopy(cfg), out_dir)
    gen = torch.Generator().manual_seed(0)
    diff = max_diff(model, reloaded, torch.rand(2, 1, cfg.preproc.image_height, cfg.preproc.image_width, generator=gen))
    if diff > 0:
        raise UserError(f"model folder {out_dir} does not reproduce {checkpoint}: max abs log-prob diff {diff:.2e}")
    files = sorted(p for p in out_dir.iterdir() if p.is_file())
    return (f"{out_dir}: model folder ({', '.join(p.name for p in files)}; "
            f"{sum(p.stat().st_size for p in files) / 2**20:.1f} MB), reloaded log-probs identical to the "
            f"checkpoint's; publish with: hf upload USER/NAME {out_dir}")


# ------------------------------------------------------------------------------------------------------- dispatch

"""Export the recognizer (backbone + CTC head, no LLM) to ONNX and check it against PyTorch, or as a model folder.

    python export.py config.yaml resume=run/best.pt [out.onnx]      # default: model.onnx beside the checkpoint
    python export.py config.yaml resume=run/best.pt export.int8=true   # model.int8.onnx, calibrated on real lines
    python export.py config.yaml resume=run/best.pt export.format=folder [OUT_DIR]   # default: run/hf_model/

The graph maps `images` (B, 1, H, W) float32 to `log_probs` (B, T, K) (log-softmax, class 0 = CTC blank) with a
dynamic batch axis; the charset and preprocessing sizes go into the file's metadata (read by onnx_runtime.py).
Uses the TorchScript exporter (dynamo=False): the torch.export-based one needs onnxscript, not a dependency here.
export.int8 quantizes the convolutions statically (onnxruntime.quantization); benchmark.py times both files.
export.format=folder writes a model folder (model_folder.py: safetensors weights, config.yaml, charset.txt, the LM
if the run has one, a model card README.md) that `hf upload USER/NAME OUT_DIR` publishes as it is.
"""
import copy
import json
import logging
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn as nn
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from dataset import LineDataset
from evaluate import lm_file
from htr.decoding import CharNgramLM, greedy_decode
from htr.inference import line_log_probs, load_model
from htr.metrics import corpus_cer
from htr.model_folder import CARD, CHARSET, CONFIG, LM, WEIGHTS, save_model_folder
from models import HTRNet, parameter_report
from htr.onnx_runtime import OnnxRecognizer, metadata
from utils import Charset, UserError, config_from_cli, run_main, to_plain

log = logging.getLogger("htr")

OPSET = 17
TOLERANCE = 1e-3          # max abs log-prob difference to PyTorch accepted by the export check
QUIET = ("You are using the legacy TorchScript", "The feature will be removed",
         "Exporting a model to ONNX with a batch_size")   # tracing caveats: parity() checks batches 2 and 3


class LogProbs(nn.Module):
    """HTRNet as one graph: images (B, 1, H, W) -> CTC log-probs (B, T, K)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x).logits.log_softmax(-1).transpose(0, 1)      # (T, B, K) -> (B, T, K)


def export(model, charset: Charset, image_height: int, image_width: int, path) -> Path:
    """Write the ONNX file (graph + metadata) for an eval-mode HTRNet on the CPU."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    x = torch.rand(2, 1, image_height, image_width)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        for message in QUIET:
            warnings.filterwarnings("ignore", message=message)
        torch.onnx.export(LogProbs(model).eval(), (x,), str(path), input_names=["images"],
                          output_names=["log_probs"], opset_version=OPSET, dynamo=False,
                          dynamic_axes={"images": {0: "batch"}, "log_probs": {0: "batch"}})
    graph = onnx.load(str(path))
    onnx.helper.set_model_props(graph, metadata(charset, image_height, image_width))
    onnx.save(graph, str(path))
    return path


def max_diff(model, other, images: torch.Tensor) -> float:
    """Max abs log-prob difference between two recognizers (HTRNet or OnnxRecognizer) on the same images."""
    return float(max(np.abs(a - b).max() for a, b in zip(line_log_probs(model, images), line_log_probs(other, images))))


def parity(model, recognizer: OnnxRecognizer, batch_sizes=(2, 3), seed: int = 0) -> float:
    """Max abs log-prob difference between PyTorch and onnxruntime on random batches."""
    gen = torch.Generator().manual_seed(seed)
    return max(max_diff(model, recognizer, torch.rand(b, 1, recognizer.image_height, recognizer.image_width,
                                                      generator=gen)) for b in batch_sizes)


def export_checked(model, charset: Charset, image_height: int, image_width: int, path) -> tuple:
    """export() + parity check: (OnnxRecognizer, max abs diff); UserError beyond TOLERANCE."""
    recognizer = OnnxRecognizer(export(model, charset, image_height, image_width, path))
    diff = parity(model, recognizer)
    if diff > TOLERANCE:
        raise UserError(f"ONNX export {path} differs from PyTorch: max abs log-prob difference {diff:.2e} > "
                        f"{TOLERANCE:g} (opset {OPSET}, torch {torch.__version__})")
    return recognizer, diff


# ----------------------------------------------------------------------------------------------------------- int8

class Feeds(CalibrationDataReader):
    """onnxruntime's calibration interface over a list of {"images": (b, 1, H, W) float32} feeds."""

    def __init__(self, feeds: list):
        self.feeds = iter(feeds)

    def get_next(self):
        return next(self.feeds, None)


def calibration_feeds(cfg, batch: int = 16) -> list:
    """export.calib_lines preprocessed lines of export.calib_split (evenly spaced), as onnxruntime feeds."""
    data = LineDataset(cfg.data.path, cfg.export.calib_split, cfg.preproc.image_height, cfg.preproc.image_width,
                       cache=cfg.data.cache)
    n = min(int(cfg.export.calib_lines), len(data))
    if n < 1:
        raise UserError(f"export.calib_lines must be at least 1, got {cfg.export.calib_lines}")
    images = torch.stack([data[int(i)][0] for i in np.linspace(0, len(data) - 1, n).round()]).numpy()  # (n,1,H,W)
    return [{"images": images[i:i + batch]} for i in range(0, n, batch)]


def quantize_int8(fp32_path, path, feeds: list) -> Path:
    """Static int8 quantization of the convolutions (QDQ: per-channel int8 weights, uint8 activations whose ranges
    are calibrated (MinMax) on `feeds`). Attention, LSTM and classifier stay fp32: in int8 they ran slower here."""
    path = Path(path)
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(path), Feeds(feeds), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, op_types_to_quantize=["Conv"])
    graph = onnx.load(str(path))
    onnx.helper.set_model_props(graph, {p.key: p.value for p in onnx.load(str(fp32_path)).metadata_props})
    onnx.save(graph, str(path))
    return path


def transcription_change(reference: OnnxRecognizer, quantized: OnnxRecognizer, feeds: list) -> float:
    """CER of the int8 model's greedy transcriptions against the fp32 model's on the same lines."""
    refs, hyps = [], []
    for feed in feeds:
        x = torch.from_numpy(feed["images"])
        refs += [greedy_decode(lp, reference.charset) for lp in reference.log_probs(x)]
        hyps += [greedy_decode(lp, quantized.charset) for lp in quantized.log_probs(x)]
    return corpus_cer(refs, hyps)


# --------------------------------------------------------------------------------------------------- model folder

TAGS = ["handwritten-text-recognition", "htr", "ocr", "ctc", "image-to-text"]


def folder_config(cfg, ckpt: dict) -> dict:
    """config.yaml of a model folder: the checkpoint's arch and preproc; the exporter's eval and decode defaults
    without this machine's paths (decode.lm_path, decode.lm_text) or one-off actions (build_lm, tune)."""
    decode = {**to_plain(cfg.decode), "lm_path": None, "lm_text": None, "build_lm": False, "tune": False}
    return {"arch": ckpt["arch"], "preproc": ckpt["preproc"], "eval": to_plain(cfg.eval), "decode": decode}


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


def read_json(path: Path) -> dict:
    """A JSON object file of the run, or {} (with a warning if it exists but is unreadable)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        log.warning("%s left out of the model card: %s", path, e)
        return {}
    return data if isinstance(data, dict) else {}


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
    data = ckpt.get("config", {}).get("data", {}).get("path", "not recorded")
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

- `data.path`: `{data}` (on the training machine)
- lines: {info.get('train_lines', 'not recorded')} train, {info.get('val_lines', 'not recorded')} val
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


# ----------------------------------------------------------------------------------------------------------- main

def export_onnx(cfg, model, charset: Charset, path: Path) -> str:
    _, diff = export_checked(model, charset, cfg.preproc.image_height, cfg.preproc.image_width, path)
    return (f"{path}: {path.stat().st_size / 2**20:.1f} MB, max abs log-prob diff vs PyTorch {diff:.1e} "
            f"(batches of 2 and 3)")


def export_int8(cfg, model, charset: Charset, path: Path) -> str:
    feeds = calibration_feeds(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        fp32, _ = export_checked(model, charset, cfg.preproc.image_height, cfg.preproc.image_width,
                                 Path(tmp) / "fp32.onnx")
        int8 = OnnxRecognizer(quantize_int8(fp32.path, path, feeds))
        change = transcription_change(fp32, int8, feeds)
    lines = sum(len(f["images"]) for f in feeds)
    return (f"{path}: {path.stat().st_size / 2**20:.1f} MB, int8 convolutions calibrated on {lines} lines of "
            f"{cfg.export.calib_split}; greedy transcriptions change by CER {change:.2%} vs fp32 on those lines "
            f"(measure accuracy with evaluate.py runtime=onnx resume={path})")


def output_path(cfg, outputs: list) -> Path:
    """The output named on the command line, else the format's default name beside the checkpoint."""
    if len(outputs) > 1:
        raise UserError(f"expected at most one output path, got {outputs}")
    if outputs:
        return Path(outputs[0])
    if not Path(cfg.resume).is_file():
        raise UserError(f"resume={cfg.resume} is no checkpoint file: name the output, e.g. python export.py "
                        f"config.yaml resume={cfg.resume} out.onnx")
    name = "hf_model" if cfg.export.format == "folder" else "model.int8.onnx" if cfg.export.int8 else "model.onnx"
    return Path(cfg.resume).parent / name


def main(argv=None):
    cfg, outputs = config_from_cli(argv, "export.py", need_resume=True, positionals=True)
    if cfg.export.format not in ("onnx", "folder"):
        raise UserError(f"export.format must be onnx or folder, got {cfg.export.format!r}")
    if cfg.export.format == "folder" and (cfg.export.int8 or not Path(cfg.resume).is_file()):
        raise UserError("export.format=folder takes a training checkpoint (resume=RUN/best.pt) and no export.int8")
    path = output_path(cfg, outputs)
    model, charset, ckpt = load_model(cfg, cfg.resume)
    if cfg.export.format == "folder":
        print(export_folder(cfg, model, charset, ckpt, path))
    else:
        print((export_int8 if cfg.export.int8 else export_onnx)(cfg, model, charset, path))


if __name__ == "__main__":
    run_main(main)

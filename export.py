"""Export the recognizer (backbone + CTC head, no LLM) to ONNX and check it against PyTorch.

    python export.py config.yaml resume=run/best.pt [out.onnx]      # default: model.onnx beside the checkpoint
    python export.py --benchmark config.yaml [key=value ...]         # eval lines/s: PyTorch eager vs onnxruntime

The graph maps `images` (B, 1, H, W) float32 to `log_probs` (B, T, K) (log-softmax, class 0 = CTC blank) with a
dynamic batch axis; the charset and preprocessing sizes go into the file's metadata (read by onnx_runtime.py).
Uses the TorchScript exporter (dynamo=False): the torch.export-based one needs onnxscript, not a dependency here.
"""
import json
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from onnx_runtime import OnnxRecognizer, metadata
from utils import Charset, UserError, config_from_cli, line_log_probs, load_model, run_main

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
    import onnx
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


def parity(model, recognizer: OnnxRecognizer, batch_sizes=(2, 3), seed: int = 0) -> float:
    """Max abs log-prob difference between PyTorch and onnxruntime on random batches."""
    gen = torch.Generator().manual_seed(seed)
    diffs = []
    for b in batch_sizes:
        x = torch.rand(b, 1, recognizer.image_height, recognizer.image_width, generator=gen)
        diffs += [np.abs(p - o).max() for p, o in zip(line_log_probs(model, x), recognizer.log_probs(x))]
    return float(max(diffs))


def export_checked(model, charset: Charset, image_height: int, image_width: int, path) -> tuple:
    """export() + parity check: (OnnxRecognizer, max abs diff); UserError beyond TOLERANCE."""
    recognizer = OnnxRecognizer(export(model, charset, image_height, image_width, path))
    diff = parity(model, recognizer)
    if diff > TOLERANCE:
        raise UserError(f"ONNX export {path} differs from PyTorch: max abs log-prob difference {diff:.2e} > "
                        f"{TOLERANCE:g} (opset {OPSET}, torch {torch.__version__})")
    return recognizer, diff


# ------------------------------------------------------------------------------------------------------ benchmark

def benchmark_onnx(cfg, batch: int = 32, steps: int = 2, repeats: int = 3) -> dict:
    """Eval lines/s at one batch size: PyTorch eager (channels_last, inference_mode) vs onnxruntime, CPU,
    random-init model of cfg.arch; best of `repeats` (shared machines are noisy)."""
    from benchmark import N_CLASSES, timed
    from models import HTRNet
    torch.manual_seed(0)
    model = HTRNet(cfg.arch, N_CLASSES).eval()
    charset = Charset("".join(chr(0x21 + i) for i in range(N_CLASSES - 1)))
    h, w = cfg.preproc.image_height, cfg.preproc.image_width
    x = torch.rand(batch, 1, h, w)
    with tempfile.TemporaryDirectory() as tmp:
        recognizer, diff = export_checked(model, charset, h, w, Path(tmp) / "model.onnx")
        model = model.to(memory_format=torch.channels_last)
        runs = {"torch_eager": lambda: line_log_probs(model, x, channels_last=True),
                "onnxruntime": lambda: recognizer.log_probs(x)}
        cpu = torch.device("cpu")
        speed = {name: batch / min(timed(fn, cpu, steps) for _ in range(repeats)) for name, fn in runs.items()}
    return {"input": [batch, 1, h, w], "threads": torch.get_num_threads(), "max_abs_diff": diff,
            **{f"{name}_lines_per_s": round(v, 2) for name, v in speed.items()},
            "onnx_speedup": round(speed["onnxruntime"] / speed["torch_eager"], 3),
            "versions": {"torch": torch.__version__, "onnxruntime": __import__("onnxruntime").__version__}}


# ----------------------------------------------------------------------------------------------------------- main

def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--benchmark"]:
        cfg, _ = config_from_cli(argv[1:], "export.py --benchmark")
        print(json.dumps(benchmark_onnx(cfg), indent=2))
        return
    cfg, outputs = config_from_cli(argv, "export.py", need_resume=True, positionals=True)
    if len(outputs) > 1:
        raise UserError(f"expected at most one output path, got {outputs}")
    model, charset, _ = load_model(cfg, cfg.resume)
    path = Path(outputs[0]) if outputs else Path(cfg.resume).parent / "model.onnx"
    _, diff = export_checked(model, charset, cfg.preproc.image_height, cfg.preproc.image_width, path)
    print(f"{path}: {path.stat().st_size / 2**20:.1f} MB, max abs log-prob diff vs PyTorch {diff:.1e} "
          f"(batches of 2 and 3)")


if __name__ == "__main__":
    run_main(main)

"""ONNX export of the recognizer (backbone + CTC head, no LLM; the library behind export.py) and its int8 variant.

The graph maps `images` (B, 1, H, W) float32 to `log_probs` (B, T, K) (log-softmax, class 0 = CTC blank) with a
dynamic batch axis; the charset and preprocessing sizes go into the file's metadata (read by htr/onnx_runtime.py).
Uses the TorchScript exporter (dynamo=False): the torch.export-based one needs onnxscript, not a dependency here.
quantize_int8 quantizes the convolutions statically (onnxruntime.quantization); benchmark.py times both files.
export_model is export.py's dispatch over export.format (onnx, int8, or a model folder: htr/model_card.py).
"""
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn as nn
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from dataset import AudioBatch, LineDataset
from htr.audio import SAMPLE_RATE
from htr.audio_model import MODES
from htr.decoding import greedy_decode
from htr.inference import load_model, max_diff
from htr.model_card import export_folder
from htr.metrics import corpus_cer
from htr.onnx_runtime import OnnxRecognizer, metadata
from utils import Charset, UserError

OPSET = 17
TOLERANCE = 1e-3          # max abs log-prob difference to PyTorch accepted by the export check
QUIET = ("You are using the legacy TorchScript", "The feature will be removed",
         "Exporting a model to ONNX with a batch_size",   # tracing caveats: parity() checks batches 2 and 3
         "Constant folding - Only steps=1")              # the audio branch's strided slices: left unfolded


class LogProbs(nn.Module):
    """HTRNet as one graph: images (B, 1, H, W) -> CTC log-probs (B, T, K); with the audio branch also audio
    (B, S) float32 at 16 kHz, audio_lengths (B,) int64 (0: no reading, or the image alone) and image_on (B,) bool
    (False: the reading alone)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, audio=None, audio_lengths=None, image_on=None):
        heard = None if audio is None else AudioBatch(audio, audio_lengths)
        return self.model(x, heard, image_on).logits.log_softmax(-1).transpose(0, 1)   # (T, B, K) -> (B, T, K)


def example_inputs(model, image_height: int, image_width: int, batch: int = 2, gen=None) -> tuple:
    """Random inputs of the graph: images, and for the audio branch readings of 1-2 s (the last line's shorter)."""
    x = torch.rand(batch, 1, image_height, image_width, generator=gen)
    if not model.has_audio:
        return (x,)
    lengths = torch.linspace(2 * SAMPLE_RATE, SAMPLE_RATE, batch).long()
    return x, torch.randn(batch, 2 * SAMPLE_RATE, generator=gen) * 0.1, lengths, torch.ones(batch, dtype=torch.bool)


def export(model, charset: Charset, image_height: int, image_width: int, path) -> Path:
    """Write the ONNX file (graph + metadata) for an eval-mode HTRNet on the CPU."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    inputs = example_inputs(model, image_height, image_width)
    names = ["images", "audio", "audio_lengths", "image_on"][:len(inputs)]
    axes = {name: {0: "batch"} for name in names + ["log_probs"]}
    if model.has_audio:
        axes["audio"][1] = "samples"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        for message in QUIET:
            warnings.filterwarnings("ignore", message=message)
        torch.onnx.export(LogProbs(model).eval(), inputs, str(path), input_names=names, output_names=["log_probs"],
                          opset_version=OPSET, dynamo=False, dynamic_axes=axes)
    graph = onnx.load(str(path))
    onnx.helper.set_model_props(graph, metadata(charset, image_height, image_width, model.has_audio))
    onnx.save(graph, str(path))
    return path


def parity(model, recognizer: OnnxRecognizer, batch_sizes=(2, 3), seed: int = 0) -> float:
    """Max abs log-prob difference between PyTorch and onnxruntime on random batches (with the audio branch: read
    from the image alone, the audio alone and both)."""
    gen = torch.Generator().manual_seed(seed)
    diffs = []
    for b in batch_sizes:
        x, *audio = example_inputs(model, recognizer.image_height, recognizer.image_width, b, gen)
        heard = AudioBatch(*audio[:2]) if audio else None
        diffs += [max_diff(model, recognizer, x, heard, m) for m in (MODES if heard is not None else ("both",))]
    return max(diffs)


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



# -------------------------------------------------------------------------------------------------------- formats

def export_onnx(cfg, model, charset: Charset, path: Path) -> str:
    _, diff = export_checked(model, charset, cfg.preproc.image_height, cfg.preproc.image_width, path)
    return (f"{path}: {path.stat().st_size / 2**20:.1f} MB, max abs log-prob diff vs PyTorch {diff:.1e} "
            f"(batches of 2 and 3)")


def export_int8(cfg, model, charset: Charset, path: Path) -> str:
    if model.has_audio:
        raise UserError("export.int8 quantizes the convolutions, the audio branch's Fourier transform among them: "
                        "export a model with arch.audio as fp32 (leave export.int8 false)")
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


def export_model(cfg, outputs: list) -> str:
    """export.py: the checkpoint cfg.resume as export.format (onnx, int8 with export.int8, or folder) to the output
    named in `outputs` (else the default beside the checkpoint); returns the summary line."""
    if cfg.export.format not in ("onnx", "folder"):
        raise UserError(f"export.format must be onnx or folder, got {cfg.export.format!r}")
    if cfg.export.format == "folder" and (cfg.export.int8 or not Path(cfg.resume).is_file()):
        raise UserError("export.format=folder takes a training checkpoint (resume=RUN/best.pt) and no export.int8")
    path = output_path(cfg, outputs)
    model, charset, ckpt = load_model(cfg, cfg.resume)
    if cfg.export.format == "folder":
        return export_folder(cfg, model, charset, ckpt, path)
    return (export_int8 if cfg.export.int8 else export_onnx)(cfg, model, charset, path)

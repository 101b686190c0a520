"""Run an exported recognizer (export.py) with onnxruntime on the CPU, without PyTorch modules.

The .onnx file is self-contained: besides the graph images (B, 1, H, W) float32 -> log_probs (B, T, K), its
metadata holds the charset and the preprocessing sizes. OnnxRecognizer.log_probs has the contract of
inference.line_log_probs, so evaluation and decoding code can use either backend (load_recognizer).
"""
from pathlib import Path

import torch

from dataset import AudioBatch
from htr.audio_model import modality_masks
from htr.inference import load_model
from utils import Charset, UserError

KEYS = ("htr.charset", "htr.image_height", "htr.image_width")
AUDIO_KEY = "htr.audio"


def metadata(charset: Charset, image_height: int, image_width: int, audio: bool = False) -> dict:
    """What export.py stores in the ONNX metadata_props (string values); htr.audio: the graph takes readings."""
    return {**dict(zip(KEYS, (charset.chars, str(image_height), str(image_width)))), AUDIO_KEY: str(int(audio))}


def open_session(path: Path):
    import onnxruntime as ort
    if path.is_dir():
        raise UserError(f"{path} is a folder; runtime=onnx takes the .onnx file export.py wrote (a model folder "
                        f"runs with runtime=torch)")
    if not path.is_file():
        raise UserError(f"ONNX model not found: {path} (write one with python export.py config.yaml resume=CKPT)")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:                   # onnxruntime raises its own (pybind) types for unreadable files
        raise UserError(f"cannot read ONNX model {path}: {str(e).splitlines()[0]}") from None


class OnnxRecognizer:
    """An exported recognizer: .charset, .image_height, .image_width and log_probs(images)."""

    def __init__(self, path):
        self.path = Path(path)
        self.session = open_session(self.path)
        meta = self.session.get_modelmeta().custom_metadata_map
        missing = [k for k in KEYS if k not in meta]
        if missing:
            raise UserError(f"{self.path} lacks the metadata {', '.join(missing)}: export it with export.py")
        self.charset = Charset(meta["htr.charset"])
        self.image_height, self.image_width = int(meta["htr.image_height"]), int(meta["htr.image_width"])
        self.has_audio = meta.get(AUDIO_KEY) == "1"                        # files from before: images only

    def log_probs(self, images: torch.Tensor, audio=None, modality: str = "both") -> list:
        """Images (B, 1, H, W) -> B arrays of CTC log-probabilities (T, K), float32 numpy, blank = class 0; with
        the audio branch, `audio` (dataset.AudioBatch or None) read from `modality` as inference.line_log_probs."""
        if tuple(images.shape[1:]) != (1, self.image_height, self.image_width):
            raise UserError(f"{self.path} takes images (B, 1, {self.image_height}, {self.image_width}), got "
                            f"{tuple(images.shape)}; set preproc.image_height/width to the exported sizes")
        feed = {"images": images.detach().float().cpu().contiguous().numpy()}          # (B, 1, H, W)
        if self.has_audio:
            feed.update(audio_feed(len(images), audio, modality))
        return list(self.session.run(["log_probs"], feed)[0])             # (B, T, K) -> B x (T, K)


def audio_feed(batch: int, audio, modality: str) -> dict:
    """The graph's audio inputs, the modality as modality_masks says: no reading (or one not read) is length 0."""
    if audio is None:
        audio = AudioBatch(torch.zeros(batch, 1), torch.zeros(batch, dtype=torch.long))
    image_on, audio_on = modality_masks(audio.lengths > 0, modality)
    lengths = torch.where(audio_on, audio.lengths, 0)
    return {"audio": audio.waves.float().contiguous().numpy(), "audio_lengths": lengths.numpy(),
            "image_on": image_on.numpy()}


def load_recognizer(cfg, path, runtime: str = "torch", device="cpu", channels_last: bool = False) -> tuple:
    """(recognizer, charset): an eval-mode HTRNet (runtime torch, on `device`) from a .pt checkpoint, a model folder
    or a Hub id (inference.load_model: a folder's arch and preproc replace cfg's), or an OnnxRecognizer from an
    exported .onnx (runtime onnx, CPU) whose sizes must match cfg.preproc."""
    if runtime == "torch":
        model, charset, _ = load_model(cfg, path)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        return model.to(device).to(memory_format=fmt), charset
    if runtime != "onnx":
        raise UserError(f"runtime must be torch or onnx, got {runtime!r}")
    recognizer = OnnxRecognizer(path)
    exported = (recognizer.image_height, recognizer.image_width)
    if exported != (cfg.preproc.image_height, cfg.preproc.image_width):
        raise UserError(f"{path} was exported for {exported[0]}x{exported[1]} lines but preproc is "
                        f"{cfg.preproc.image_height}x{cfg.preproc.image_width}; use the config it was trained with")
    return recognizer, recognizer.charset

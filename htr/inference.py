"""The recognizer at inference: a checkpoint, model folder or Hub model loaded for evaluation, CTC log-probs of a
batch, greedy predictions, and image files transcribed one by one (demo.py) with their gt.txt ground truth."""
import logging
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf, open_dict

from dataset import AudioBatch
from htr.audio import read_audio
from htr.audio_model import modality_masks
from htr.decoding import greedy_decode, line_confidence
from htr.images import load_for_inference
from htr.model_folder import CHARSET, WEIGHTS, model_folder, read_model_folder
from models import HTRNet, fuse_conv_bn
from utils import (Charset, UserError, autocast_dtype, check_compatible, load_checkpoint, resolve_device,
                   to_plain)

log = logging.getLogger("htr")


def load_model(cfg, path):
    """Build the recognizer for inference (eval mode, BatchNorm folded into the convolutions) from a .pt checkpoint
    (whose arch and preproc must match cfg's), a model folder or a Hub id (model_folder.py): (model, charset,
    checkpoint-like dict with the unfolded state_dict under "model"). A folder brings its own architecture: its arch
    and preproc replace cfg's, in place, so that callers preprocess lines to its size, and its LM becomes
    decode.lm_path unless one is set."""
    folder = model_folder(path)
    if folder is None:
        ckpt = load_checkpoint(path)
        check_compatible(ckpt, cfg, path)
        sources = (path, path)
    else:
        ckpt = read_model_folder(folder)
        adopt_folder_settings(cfg, ckpt, folder)
        sources = (folder / WEIGHTS, folder / CHARSET)
    charset = Charset(ckpt["charset"])
    model = HTRNet(cfg.arch, len(charset))
    load_weights(model, ckpt["model"], *sources)
    return fuse_conv_bn(model.eval()), charset, ckpt


def adopt_folder_settings(cfg, ckpt: dict, folder, keep=(), lm: bool = True) -> None:
    """cfg takes a model folder's arch and preproc (noted where they differ) but the `keep` keys (e.g. "arch.audio"),
    and with `lm` its LM unless decode.lm_path is set."""
    changed = [f"{s}.{k}={v}" for s in ("arch", "preproc") for k, v in ckpt[s].items()
               if f"{s}.{k}" not in keep and to_plain(cfg[s]).get(k) != v]
    if changed:
        log.info("model folder %s brings its own settings: %s", folder, ", ".join(changed))
    kept = {key: OmegaConf.select(cfg, key) for key in keep}
    with open_dict(cfg):
        cfg.arch, cfg.preproc = ckpt["arch"], ckpt["preproc"]
        for key, value in kept.items():
            OmegaConf.update(cfg, key, value, force_add=True)
        if lm and ckpt["lm"] is not None and not cfg.decode.lm_path:
            cfg.decode.lm_path = str(ckpt["lm"])


def load_weights(model: HTRNet, state: dict, weights_source, charset_source) -> None:
    """Load `state` into `model`; a mismatch is one UserError: of the class count (naming the charset's source) or
    of the architecture (naming the tensors)."""
    own, wrong = model.state_dict(), model.mismatched(state)
    if wrong and all(k in own and k in state and k.rsplit(".", 1)[0] in model.class_layers() for k in wrong):
        raise UserError(f"{charset_source} has {own[wrong[0]].shape[0] - 1} characters but {weights_source} has "
                        f"{state[wrong[0]].shape[0] - 1} output classes besides the CTC blank: the two files come "
                        f"from different models")
    if wrong:
        raise UserError(f"{weights_source} does not fit the architecture (arch): tensors missing or of another "
                        f"shape: {', '.join(wrong[:8])}" + (f" and {len(wrong) - 8} more" if len(wrong) > 8 else ""))
    model.load_state_dict(state)


@torch.inference_mode()
def line_log_probs(model, images: torch.Tensor, channels_last: bool = False, autocast_dtype=None, audio=None,
                   modality: str = "both") -> list:
    """Images (B, 1, H, W) -> B arrays of CTC log-probabilities (T, K), float32 numpy, blank = class 0; with
    `audio` (dataset.AudioBatch) read from `modality` (htr.audio_model.MODES). `model` is an HTRNet or an
    onnx_runtime.OnnxRecognizer."""
    if not isinstance(model, torch.nn.Module):
        return model.log_probs(images, audio, modality)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    device = next(model.parameters()).device
    images = images.to(device, non_blocking=True).contiguous(memory_format=fmt)
    masks = modality_masks(audio.lengths > 0, modality) if audio is not None else ()
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        logits = model(images, audio, *masks).logits                       # (T, B, K)
    return list(logits.float().log_softmax(-1).transpose(0, 1).cpu().numpy())


def predict(model, loader, charset: Charset, channels_last: bool = False, autocast_dtype=None,
            modality: str = "both") -> dict:
    """Greedy transcriptions, confidences and log-probs for a loader of Collate batches, the lines' readings (if
    any) used as `modality` says."""
    out = {"ids": [], "refs": [], "log_probs": []}
    for batch in loader:
        out["ids"] += batch.ids
        out["refs"] += batch.texts
        out["log_probs"] += line_log_probs(model, batch.images, channels_last, autocast_dtype, batch.audio, modality)
    out["hyps"] = [greedy_decode(lp, charset) for lp in out["log_probs"]]
    out["confidences"] = [line_confidence(lp) for lp in out["log_probs"]]
    return out


def ground_truth(image: Path):
    """The transcription of `image` in a gt.txt beside it, if there is one."""
    gt = image.parent / "gt.txt"
    if not gt.is_file():
        return None
    for line in gt.read_text(encoding="utf-8", errors="replace").splitlines():
        line_id, _, text = line.partition(" ")
        if line_id == image.stem:
            return text.strip()
    return None


def transcribe(model, charset, items, cfg) -> list:
    """[(greedy transcription, confidence)] of each (image file, audio file) pair, either one None (a line read
    from its image or its reading alone), preprocessed as cfg.preproc says."""
    dtype = autocast_dtype(cfg.eval.mixed_precision, resolve_device(cfg.device))
    results = []
    for image, audio in items:
        if audio is not None and not getattr(model, "has_audio", False):
            raise UserError(f"--audio {audio}: this model reads images only (it was trained without "
                            f"arch.audio.enabled=true)")
        x = torch.zeros(1, 1, cfg.preproc.image_height, cfg.preproc.image_width) if image is None else \
            line_image(image, cfg)
        if audio is not None and not Path(audio).is_file():
            raise UserError(f"--audio {audio}: no such file")
        reading = None if audio is None else AudioBatch.of([read_audio(audio)])
        modality = "audio" if image is None else "both"
        log_probs = line_log_probs(model, x, True, dtype, reading, modality)[0]   # (T, K)
        results.append((greedy_decode(log_probs, charset), line_confidence(log_probs)))
    return results


def line_image(path, cfg) -> torch.Tensor:
    """(1, 1, H, W) of an image file, preprocessed as cfg.preproc says."""
    try:
        return load_for_inference(path, cfg.preproc.image_height, cfg.preproc.image_width).unsqueeze(0)
    except ValueError as e:
        raise UserError(f"{path}: {e} (expected an image file OpenCV can read: png, jpg, tif, ...)") from None


def max_diff(model, other, images: torch.Tensor, audio=None, modality: str = "both") -> float:
    """Max abs log-prob difference between two recognizers (HTRNet or OnnxRecognizer) on the same lines."""
    a, b = (line_log_probs(m, images, audio=audio, modality=modality) for m in (model, other))
    return float(max(np.abs(x - y).max() for x, y in zip(a, b)))

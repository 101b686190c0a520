"""The recognizer at inference: a checkpoint loaded for evaluation, CTC log-probs of a batch, greedy predictions."""
import torch

from decoding import greedy_decode, line_confidence
from models import HTRNet, fuse_conv_bn
from utils import Charset, check_compatible, load_checkpoint


def load_model(cfg, path):
    """Build the recognizer from a checkpoint for inference (eval mode, BatchNorm folded into the convolutions):
    (model, charset, checkpoint dict)."""
    ckpt = load_checkpoint(path)
    check_compatible(ckpt, cfg, path)
    charset = Charset(ckpt["charset"])
    model = HTRNet(cfg.arch, len(charset))
    model.load_state_dict(ckpt["model"])
    return fuse_conv_bn(model.eval()), charset, ckpt


@torch.inference_mode()
def line_log_probs(model, images: torch.Tensor, channels_last: bool = False, autocast_dtype=None) -> list:
    """Images (B, 1, H, W) -> B arrays of CTC log-probabilities (T, K), float32 numpy, blank = class 0.
    `model` is an HTRNet or an onnx_runtime.OnnxRecognizer."""
    if not isinstance(model, torch.nn.Module):
        return model.log_probs(images)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    device = next(model.parameters()).device
    images = images.to(device, non_blocking=True).contiguous(memory_format=fmt)
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        logits = model(images).logits                                      # (T, B, K)
    return list(logits.float().log_softmax(-1).transpose(0, 1).cpu().numpy())


def predict(model, loader, charset: Charset, channels_last: bool = False, autocast_dtype=None) -> dict:
    """Greedy transcriptions, confidences and log-probs for a loader of Collate batches."""
    out = {"ids": [], "refs": [], "log_probs": []}
    for images, _, _, texts, ids in loader:
        out["ids"] += ids
        out["refs"] += texts
        out["log_probs"] += line_log_probs(model, images, channels_last, autocast_dtype)
    out["hyps"] = [greedy_decode(lp, charset) for lp in out["log_probs"]]
    out["confidences"] = [line_confidence(lp) for lp in out["log_probs"]]
    return out

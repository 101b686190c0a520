"""The LLM path's probe (what probe_llm.py reports): on a few training batches of a run trained with
train.use_llm=true, the losses with and without the visual prefix, the prefix's scale, and the gradients of L_CTC and
of alpha x L_LLM at the tapped features."""
from pathlib import Path

import torch

from dataset import EpochBatchSampler, LineDataset, line_loader
from htr.llm_assist import LLMLoadError, build_llm_assist
from models import HTRNet, ctc_loss
from utils import Charset, UserError, autocast_dtype, check_compatible, load_checkpoint, resolve_device


def probe_batch(model, assist, batch, tap: str, alpha: float, dtype) -> dict:
    images, targets, lengths, texts = batch[:4]
    device = next(model.parameters()).device
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        out = model(images.to(device))
        feats = out.features[tap]                                         # (B, T, C)
        l_ctc = ctc_loss(out.logits, targets, lengths)
        l_llm = assist(feats, texts)
        losses = assist.diagnostics(feats, texts)
    g_ctc, = torch.autograd.grad(l_ctc, feats, retain_graph=True)                        # (B, T, C)
    g_llm, = torch.autograd.grad(alpha * l_llm, feats)
    return {"l_ctc": l_ctc.item(), "l_llm": losses["llm"], "l_llm_shuffled_prefix": losses["llm_shuffled"],
            "l_text_only": losses["llm_text_only"], "prefix_rms": losses["prefix_rms"],
            "grad_norm_ctc": g_ctc.norm().item(), "grad_norm_llm": g_llm.norm().item(),
            "grad_cosine": torch.nn.functional.cosine_similarity(g_ctc.flatten(), g_llm.flatten(), dim=0).item()}


def probe(cfg, checkpoint, batches: int) -> dict:
    """The run's recognizer and connector from `checkpoint`, the frozen LM from llm.name, on its training lines."""
    ckpt = load_checkpoint(checkpoint)
    if "llm" not in ckpt:
        raise UserError(f"{checkpoint} was trained without the LLM path: probe a run with train.use_llm=true")
    check_compatible(ckpt, cfg, checkpoint)
    device = resolve_device(cfg.device)
    charset = Charset(ckpt["charset"])
    model = HTRNet(cfg.arch, len(charset)).to(device)
    model.load_state_dict(ckpt["model"])
    tap = cfg.train.llm_tap
    try:
        assist = build_llm_assist(cfg.llm, device, feat_dim=model.tap_width(tap))
        assist.load_trainable_state_dict(ckpt["llm"]["trainable"])
    except (ValueError, LLMLoadError) as e:
        raise UserError(f"{checkpoint}: {e}") from None
    model.eval(), assist.eval()
    data = LineDataset(Path(cfg.data.path), "train", cfg.preproc.image_height, cfg.preproc.image_width,
                       cfg.data.cache)
    loader = line_loader(data, charset, batch_sampler=EpochBatchSampler(len(data), cfg.train.batch_size, cfg.seed))
    dtype = autocast_dtype(cfg.train.mixed_precision, device, "train.mixed_precision")
    rows = [probe_batch(model, assist, batch, tap, cfg.train.llm_alpha, dtype)
            for _, batch in zip(range(batches), loader)]
    report = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
    report.update(checkpoint=str(checkpoint), step=ckpt["step"], batches=len(rows), alpha=cfg.train.llm_alpha,
                  llm=cfg.llm.name)
    return report

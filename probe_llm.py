"""Is the LLM path doing anything? Probe a checkpoint trained with train.use_llm=true; JSON on stdout.

    python probe_llm.py config.yaml resume=RUN/last.pt [key=value ...] [--batches 8]

On `--batches` training batches (the run's data, not augmented, dropout off), every line also goes through the
LLM path, and it reports:
  - the losses: L_CTC (main head), L_LLM (frozen LM teacher-forced after the visual prefix), L_LLM with the prefix
    of another line of the batch (shuffled), and the LM's own loss on the text alone (no prefix). The connector has
    learned something about the image when L_LLM < text-only, and something about *this* line when L_LLM <
    shuffled;
  - the gradients of L_CTC and of alpha x L_LLM at the tapped features (the first BiLSTM layer's output): their
    norms and cosine, i.e. how much, and in which direction, the LLM pushes the recognizer compared with CTC.
"""
import argparse
import json
from pathlib import Path

import torch

from dataset import EpochBatchSampler, LineDataset, line_loader
from models import HTRNet, build_llm_assist, build_lm_batch, ctc_loss
from utils import (Charset, UserError, autocast_dtype, check_compatible, load_checkpoint, load_config, resolve_device,
                   run_main)


def text_only_loss(lm, texts) -> torch.Tensor:
    """The frozen LM's mean token loss on [BOS] + text + EOS: what it predicts without seeing the line."""
    batch = build_lm_batch(lm.encode(texts), 0, lm.bos_id, lm.eos_id, lm.pad_id).to(lm.model.device)
    return lm(lm.embed(batch.input_ids), batch.attention_mask, batch.labels, first_label=batch.prefix_start + 1)


def probe_batch(model, assist, batch, alpha: float, dtype) -> dict:
    images, targets, lengths, texts, _ = batch
    device = next(model.parameters()).device
    tapped = []                                                          # the first BiLSTM layer's output (T, B, 2h)
    hook = model.head.rnn1.register_forward_hook(lambda module, args, output: tapped.append(output[0]))
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        out = model(images.to(device))
        l_ctc = ctc_loss(out.logits, targets, lengths)
        l_llm = assist(out.rnn1, texts)
        with torch.no_grad():
            shuffled = assist(out.rnn1.roll(1, dims=0), texts).item() if len(texts) > 1 else float("nan")
            text_only = text_only_loss(assist.lm, texts).item()
    hook.remove()
    g_ctc, = torch.autograd.grad(l_ctc, tapped[0], retain_graph=True)                   # (T, B, 2h)
    g_llm, = torch.autograd.grad(alpha * l_llm, tapped[0])
    return {"l_ctc": l_ctc.item(), "l_llm": l_llm.item(), "l_llm_shuffled_prefix": shuffled,
            "l_text_only": text_only, "grad_norm_ctc": g_ctc.norm().item(), "grad_norm_llm": g_llm.norm().item(),
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
    assist = build_llm_assist(cfg.llm, device, feat_dim=2 * cfg.arch.rnn_hidden_size)
    assist.load_trainable_state_dict(ckpt["llm"]["trainable"])
    model.eval(), assist.eval()
    data = LineDataset(Path(cfg.data.path), "train", cfg.preproc.image_height, cfg.preproc.image_width,
                       cfg.data.cache)
    loader = line_loader(data, charset, batch_sampler=EpochBatchSampler(len(data), cfg.train.batch_size, cfg.seed))
    dtype = autocast_dtype(cfg.train.mixed_precision, device, "train.mixed_precision")
    rows = [probe_batch(model, assist, batch, cfg.train.llm_alpha, dtype) for _, batch in zip(range(batches), loader)]
    report = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
    report.update(checkpoint=str(checkpoint), step=ckpt["step"], batches=len(rows), alpha=cfg.train.llm_alpha,
                  llm=cfg.llm.name)
    return report


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides; resume=CHECKPOINT is required")
    parser.add_argument("--batches", type=int, default=8)
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if not cfg.resume:
        raise UserError("no checkpoint given: add resume=RUN/last.pt (a run trained with train.use_llm=true)")
    print(json.dumps(probe(cfg, cfg.resume, args.batches), indent=2))


if __name__ == "__main__":
    run_main(main)

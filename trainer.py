"""Train the recognizer: python trainer.py config.yaml [key.sub=value ...]

Single device with plain `python trainer.py`; several GPUs with `accelerate launch trainer.py config.yaml`.
"""
import json
import logging
import math
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader
from tqdm import tqdm

from dataset import Collate, LineDataset, seed_worker
from inference import predict
from metrics import error_rates
from models import HTRNet, ctc_loss, parameter_report
from runlog import RunLog
from utils import (Charset, UserError, autocast_dtype, check_compatible, config_from_cli, load_checkpoint,
                   mixed_precision, resolve_device, run_main, save_checkpoint, to_plain, train_memory_format,
                   use_fixed_size_kernels)

log = logging.getLogger("htr")


def lr_factor(step: int, steps_per_epoch: int, cfg_train) -> float:
    """Linear warm-up, then 'mstep' (x0.1 at 50% and 75% of the epochs), 'cosine' or 'none'."""
    warm = min(1.0, (step + 1) / cfg_train.warmup_steps) if cfg_train.warmup_steps else 1.0
    epochs = cfg_train.num_epochs
    if cfg_train.scheduler == "mstep":
        epoch = step // steps_per_epoch
        return warm * 0.1 ** sum(epoch >= int(f * epochs) for f in (0.5, 0.75))
    if cfg_train.scheduler == "cosine":
        return warm * 0.5 * (1 + math.cos(math.pi * min(1.0, step / (epochs * steps_per_epoch))))
    if cfg_train.scheduler == "none":
        return warm
    raise UserError(f"train.scheduler must be mstep, cosine or none, got {cfg_train.scheduler!r}")


def git_commit() -> str:
    try:
        here = Path(__file__).resolve().parent
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=here, capture_output=True, text=True).stdout
        return commit.stdout.strip() + ("-dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def make_accelerator(cfg):
    from accelerate import Accelerator
    device = resolve_device(cfg.device)
    use_fixed_size_kernels(device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    mp = mixed_precision(cfg.train.mixed_precision, device, "train.mixed_precision")
    return Accelerator(mixed_precision=mp, cpu=device.type == "cpu")


class Trainer:
    def __init__(self, cfg, resume_ckpt=None):
        self.cfg = cfg
        self.acc = make_accelerator(cfg)
        torch.manual_seed(cfg.seed)
        self.loader_rng = torch.Generator().manual_seed(cfg.seed)
        self.train_set, self.val_set = self._datasets()
        self.charset = Charset.from_texts(self.train_set.texts + (self.val_set.texts if self.val_set else []))
        self.model = HTRNet(cfg.arch, len(self.charset))
        self.llm = self._llm() if cfg.train.use_llm else None
        self.params = list(self.model.parameters()) + (self.llm.trainable_parameters() if self.llm else [])
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        self.loader = self._loader(self.train_set, cfg.train.batch_size, shuffle=True, workers=cfg.train.num_workers)
        steps_per_epoch = len(self.loader)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, steps_per_epoch, cfg.train))
        self.epoch, self.step, self.best_cer, self.bad_validations = 0, 0, math.inf, 0
        if resume_ckpt is not None:
            self._restore(*resume_ckpt)
        self.fmt = train_memory_format(cfg.train.channels_last, self.acc.device)
        self.model = self.model.to(memory_format=self.fmt)
        self.model, self.optimizer = self.acc.prepare(self.model, self.optimizer)
        if self.llm is not None:
            self.llm = self.acc.prepare(self.llm)                          # autocast (and DDP on several GPUs)
        if self.acc.num_processes > 1:
            self.loader = self.acc.prepare(self.loader)
        self.run_dir = self._run_dir(cfg.resume)
        self.runlog = RunLog(self.run_dir, enabled=self.acc.is_main_process)
        self.stop_signal = None

    # ------------------------------------------------------------------------------------------------- set-up
    def _datasets(self):
        cfg, pre = self.cfg, self.cfg.preproc
        root = Path(cfg.data.path)
        if not root.is_dir():
            raise UserError(f"data.path {root} does not exist; prepare data with prepare_iam.py or "
                            f"prepare_synthetic.py, or set data.path=DIR")
        train = LineDataset(root, "train", pre.image_height, pre.image_width, cfg.data.cache, cfg.train.augment)
        val = LineDataset(root, "val", pre.image_height, pre.image_width, cfg.data.cache) \
            if (root / "val").is_dir() else None
        if val is None:
            log.warning("no %s/val split: training without validation (best.pt is not written)", root)
        return train, val

    def _loader(self, dataset, batch_size: int, shuffle: bool, workers: int) -> DataLoader:
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers,
                          collate_fn=Collate(self.charset), worker_init_fn=seed_worker, generator=self.loader_rng,
                          pin_memory=self.acc.device.type == "cuda", drop_last=False)

    def _llm(self):
        if self.cfg.arch.head_type == "cnn":
            raise UserError("train.use_llm=true needs a recurrent head (arch.head_type both or rnn)")
        from models import LLMLoadError, build_llm_assist
        try:
            assist = build_llm_assist(self.cfg.llm, self.acc.device, feat_dim=2 * self.cfg.arch.rnn_hidden_size)
        except LLMLoadError as e:
            raise UserError(str(e)) from None
        log.info("LLM path: %s, connector + LoRA %.2fM trainable parameters", self.cfg.llm.name,
                 sum(p.numel() for p in assist.trainable_parameters()) / 1e6)
        return assist

    def _run_dir(self, resume) -> Path:
        if resume:
            return Path(resume).resolve().parent
        name = self.cfg.model.run_name or datetime.now().strftime("%Y%m%d-%H%M%S")
        return Path(self.cfg.model.save_dir) / str(name)

    def _restore(self, ckpt: dict, path) -> None:
        check_compatible(ckpt, self.cfg, path, self.charset)
        if (self.llm is not None) != ("llm" in ckpt):
            raise UserError(f"checkpoint {path} was trained {'without' if self.llm else 'with'} the LLM path; "
                            f"resume with train.use_llm={'false' if self.llm else 'true'} or start a new run")
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.llm is not None:
            try:
                self.llm.load_trainable_state_dict(ckpt["llm"]["trainable"])
            except ValueError as e:
                raise UserError(f"checkpoint {path}: {e}") from None
        self.epoch, self.step, self.best_cer = ckpt["epoch"], ckpt["step"], ckpt["best_cer"]
        self.bad_validations = ckpt["bad_validations"]
        torch.set_rng_state(ckpt["rng"]["torch"])
        self.loader_rng.set_state(ckpt["rng"]["loader"])
        if torch.cuda.is_available() and "cuda" in ckpt["rng"]:
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
        log.info("resumed from %s at epoch %d, step %d (best val CER %.4f)", path, self.epoch, self.step,
                 self.best_cer)

    def checkpoint_state(self) -> dict:
        rng = {"torch": torch.get_rng_state(), "loader": self.loader_rng.get_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        state = {"format": 1, "model": self.acc.unwrap_model(self.model).state_dict(),
                 "charset": self.charset.chars, "arch": to_plain(self.cfg.arch),
                 "preproc": to_plain(self.cfg.preproc), "config": to_plain(self.cfg),
                 "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "epoch": self.epoch, "step": self.step, "best_cer": self.best_cer,
                 "bad_validations": self.bad_validations, "rng": rng}
        if self.llm is not None:
            state["llm"] = {"name": self.cfg.llm.name,
                            "trainable": self.acc.unwrap_model(self.llm).trainable_state_dict()}
        return state

    def save(self, name: str) -> Path:
        path = self.run_dir / name
        if self.acc.is_main_process:
            save_checkpoint(self.checkpoint_state(), path)
        return path

    def write_run_info(self) -> None:
        if not self.acc.is_main_process:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.cfg, self.run_dir / "config.yaml", resolve=True)
        (self.run_dir / "charset.txt").write_text(self.charset.chars, encoding="utf-8")
        params = parameter_report(self.acc.unwrap_model(self.model))
        if self.llm is not None:
            params["llm_trainable"] = sum(p.numel() for p in self.acc.unwrap_model(self.llm).trainable_parameters())
        info = {"git_commit": git_commit(), "argv": sys.argv, "torch": torch.__version__,
                "device": str(self.acc.device), "mixed_precision": self.acc.mixed_precision,
                "parameters": params, "train_lines": len(self.train_set),
                "val_lines": len(self.val_set) if self.val_set else 0, "charset_size": len(self.charset.chars)}
        (self.run_dir / "run_info.json").write_text(json.dumps(info, indent=2))
        log.info("parameters: %s", ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in params.items()))

    # ------------------------------------------------------------------------------------------------ training
    def _on_signal(self, signum, frame):
        self.stop_signal = signum
        log.warning("received %s: stopping after this step and writing a checkpoint",
                    signal.Signals(signum).name)

    def _stop_requested(self) -> bool:
        max_steps = self.cfg.train.max_steps
        return self.stop_signal is not None or (max_steps > 0 and self.step >= max_steps)

    def loss(self, images, targets, lengths, texts) -> dict:
        out = self.model(images)
        losses = {"ctc": ctc_loss(out.logits, targets, lengths)}
        if out.shortcut is not None and self.cfg.train.shortcut_weight:
            losses["shortcut"] = ctc_loss(out.shortcut, targets, lengths)
        total = losses["ctc"] + self.cfg.train.shortcut_weight * losses.get("shortcut", 0.0)
        if self.llm is not None:
            idx = self.acc.unwrap_model(self.llm).sample_indices(len(texts), self.cfg.train.llm_sample_ratio)
            losses["llm"] = self.llm(out.rnn1[idx.to(out.rnn1.device)], [texts[i] for i in idx.tolist()])
            total = total + self._llm_alpha() * losses["llm"]
        losses["total"] = total
        return losses

    def _llm_alpha(self) -> float:
        warm = self.cfg.train.llm_alpha_warmup_steps
        return self.cfg.train.llm_alpha * (min(1.0, self.step / warm) if warm else 1.0)

    def train_epoch(self) -> dict:
        """One pass over the training data; returns mean losses and throughput (or None if stopped early)."""
        self.model.train()
        if self.llm is not None:
            self.llm.train()                                               # connector dropout; the LLM stays eval
        if self.cfg.train.num_workers == 0:
            self.train_set.reseed(int(torch.randint(2**31, (1,), generator=self.loader_rng)))
        sums, lines, t0 = {}, 0, time.perf_counter()
        bar = tqdm(self.loader, desc=f"epoch {self.epoch + 1}", leave=False, disable=not self.acc.is_main_process)
        for images, targets, lengths, texts, _ in bar:
            if self._stop_requested():
                return None
            images = images.to(self.acc.device, non_blocking=True).contiguous(memory_format=self.fmt)
            losses = self.loss(images, targets, lengths, texts)
            self.optimizer.zero_grad(set_to_none=True)
            self.acc.backward(losses["total"])
            if self.cfg.train.grad_clip:
                self.acc.clip_grad_norm_(self.params, self.cfg.train.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            self.step += 1
            lines += len(texts)
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach()) * len(texts)
            rate = lines / (time.perf_counter() - t0)
            bar.set_postfix({k: f"{v.item():.3f}" for k, v in losses.items() if k != "shortcut"},
                            lr=f"{self.scheduler.get_last_lr()[0]:.2e}", lines_s=f"{rate:.1f}")
        stats = {f"train_{k}": v / max(lines, 1) for k, v in sums.items()}
        stats.update(lines_per_s=lines / (time.perf_counter() - t0), lr=self.scheduler.get_last_lr()[0])
        return stats

    def validate(self) -> dict:
        model = self.acc.unwrap_model(self.model).eval()
        loader = DataLoader(self.val_set, batch_size=self.cfg.eval.batch_size, num_workers=self.cfg.eval.num_workers,
                            collate_fn=Collate(self.charset))
        dtype = autocast_dtype(self.acc.mixed_precision, self.acc.device)      # validate as we train
        out = predict(model, loader, self.charset, self.fmt == torch.channels_last, dtype)
        metrics = error_rates(out["refs"], out["hyps"], self.cfg.eval.wer_mode)
        return {"val_cer": metrics["cer"], "val_wer": metrics["wer"]}

    def _after_epoch(self, stats: dict) -> bool:
        """Validate / save as scheduled; returns True when early stopping says to stop."""
        cfg = self.cfg.train
        last = self.epoch == cfg.num_epochs
        if self.val_set is not None and (self.epoch % cfg.val_every_k_epochs == 0 or last):
            stats.update(self.validate())
            if stats["val_cer"] < self.best_cer:
                self.best_cer, self.bad_validations = stats["val_cer"], 0
                self.save("best.pt")
            else:
                self.bad_validations += 1
            log.info("epoch %d: val CER %.4f WER %.4f (best %.4f)", self.epoch, stats["val_cer"],
                     stats["val_wer"], self.best_cer)
        if self.epoch % cfg.save_every_k_epochs == 0 or last or "val_cer" in stats:
            self.save("last.pt")
        self.runlog.record(self.epoch, self.step, stats)
        patience = cfg.early_stopping_patience
        return patience > 0 and self.bad_validations >= patience

    def fit(self) -> Path:
        self.write_run_info()
        handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            while self.epoch < self.cfg.train.num_epochs and not self._stop_requested():
                stats = self.train_epoch()
                if stats is None:
                    break
                self.epoch += 1
                log.info("epoch %d: loss %.4f, %.1f lines/s", self.epoch, stats["train_total"], stats["lines_per_s"])
                if self._after_epoch(stats):
                    log.info("early stopping: no better val CER in %d validations", self.bad_validations)
                    break
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)
            self.runlog.close()
        path = self.save("last.pt")
        if self.stop_signal is not None:
            log.warning("interrupted in epoch %d at step %d; checkpoint %s (resume with resume=%s)",
                        self.epoch + 1, self.step, path, path)
        return path


def main(argv=None):
    cfg, _ = config_from_cli(argv, "trainer.py")
    resume = (load_checkpoint(cfg.resume), cfg.resume) if cfg.resume else None
    path = Trainer(cfg, resume).fit()
    log.info("done: %s", path)


if __name__ == "__main__":
    run_main(main)

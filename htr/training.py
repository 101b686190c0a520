"""Training the recognizer (and the LLM path's connector): the Trainer (data, model, optimizer, checkpoints,
validation, stop signals) and `train`, what trainer.py runs; the schedule and the stage's config are htr/recipe.py's."""
import json
import logging
import math
import os
import signal
import sys
import time
from datetime import datetime
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch.utils.data import Subset
from tqdm import tqdm

from dataset import STOP_SIGNALS, EpochBatchSampler, line_loader, worker_count
from htr.audio import open_split
from htr.audio_model import loss_per_mix, mix_names, modality_dropout
from htr.corpus_licence import data_licence
from htr.cuda_graphs import GraphedForward, check_cuda_graphs
from htr.inference import predict
from htr.init_from import init_checkpoint, init_weights
from htr.metrics import corpus_cer, error_counts, rates
from htr.recipe import lr_factor, stage_config
from htr.runlog import RunLog, git_commit
from htr.training_data import KEY as TRAINING_DATA, recorded_stages, stage_record
from htr.weight_ema import WeightEMA
from models import AUDIO_MODULES, HTRNet, audio_ctc_loss, ctc_loss, output_frames, parameter_report
from utils import (RESUME_KEYS, Charset, UserError, atomic_write, autocast_dtype, check_compatible,
                   load_checkpoint, make_optimizer, mixed_precision, remove_stale_temp_files, resolve_device,
                   save_checkpoint, set_torch_threads, to_plain, train_memory_format, use_fixed_size_kernels)

log = logging.getLogger("htr")


def make_accelerator(cfg):
    from accelerate import Accelerator
    from accelerate.utils import AutocastKwargs
    device = resolve_device(cfg.device)
    use_fixed_size_kernels(device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    mp = mixed_precision(cfg.train.mixed_precision, device, "train.mixed_precision")
    graphs = [AutocastKwargs(cache_enabled=False)] if cfg.train.cuda_graphs else []    # a graph cannot use the cache
    return Accelerator(mixed_precision=mp, cpu=device.type == "cpu", kwargs_handlers=graphs)


class Trainer:
    def __init__(self, cfg, resume_ckpt=None):
        cfg = self.cfg = stage_config(cfg)
        self.frozen = cfg.train.stage == "align"                           # the recognizer does not train
        self.acc = make_accelerator(cfg)
        check_cuda_graphs(cfg, self.acc.device, self.acc.num_processes)
        if not self.acc.is_main_process:
            log.setLevel(logging.WARNING)                                  # one process reports
        torch.manual_seed(cfg.seed)
        init = init_checkpoint(cfg)                                        # a model folder brings arch and preproc
        with self.acc.main_process_first():                                # one process builds the caches
            self.train_set, self.val_set = self._datasets()
        self.stages = recorded_stages(*resume_ckpt) if resume_ckpt else [
            *(recorded_stages(*init) if init else []), stage_record(cfg, len(self.train_set))]   # training data
        self.charset = self._charset(resume_ckpt, init)
        if not 0 <= cfg.train.drop_path < 1:
            raise UserError(f"train.drop_path must be in [0, 1) (e.g. 0.1), or 0 for none; got {cfg.train.drop_path}")
        self.model = HTRNet(cfg.arch, len(self.charset), cfg.train.drop_path).requires_grad_(not self.frozen)
        self.llm = self._llm() if cfg.train.use_llm else None
        self.features = {}                                                 # the head's tap tensors of this step
        if self.llm is not None:
            self.model.head.register_forward_hook(lambda module, args, out: self.features.update(out.features))
        if init is not None:
            init_weights(self.model, self.llm, *init, cfg, self.charset.chars)
        if cfg.train.freeze_image_path:
            self._freeze_image_path()
        self.ema = WeightEMA(self.model, cfg.train.ema_decay) if cfg.train.ema_decay and not self.frozen else None
        self.clip_groups = self._clip_groups()
        self.optimizer = make_optimizer([{"params": params, "lr": lr} for params, lr, _ in self.clip_groups],
                                        cfg.train.lr, cfg.train.weight_decay)
        self.sampler = EpochBatchSampler(len(self.train_set), cfg.train.batch_size, cfg.seed,
                                         num_replicas=self.acc.num_processes, rank=self.acc.process_index)
        workers = self._workers(cfg.train.num_workers, "train.num_workers")
        if self.acc.device.type == "cpu":
            set_torch_threads(cfg.train.num_threads, workers, "train.num_threads",
                              int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
        self.loader = line_loader(self.train_set, self.charset, batch_sampler=self.sampler, workers=workers,
                                  timeout=cfg.data.loader_timeout, pin_memory=self.acc.device.type == "cuda")
        steps_per_epoch = self.sampler.steps_per_epoch                     # per process, after sharding
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, steps_per_epoch, cfg.train))
        self.epoch, self.epoch_step, self.step, self.best_cer, self.bad_validations = 0, 0, 0, math.inf, 0
        if resume_ckpt is not None:
            self._restore(*resume_ckpt)
        self.fmt = train_memory_format(cfg.train.channels_last, self.acc.device)
        self.model = self.model.to(memory_format=self.fmt)
        if self.ema is not None:
            self.ema.average.to(self.acc.device, memory_format=self.fmt)
        if self.frozen:                                                    # no gradients: no DDP wrapper
            self.model, self.optimizer = self.model.to(self.acc.device), self.acc.prepare(self.optimizer)
        else:
            self.model, self.optimizer = self.acc.prepare(self.model, self.optimizer)
        self.forward = GraphedForward(self.model) if cfg.train.cuda_graphs else self.model
        if self.llm is not None:
            self.llm = self.acc.prepare(self.llm)                          # autocast (and DDP on several GPUs)
        self.run_dir = self._run_dir(cfg.resume)
        self.runlog = RunLog(self.run_dir, enabled=self.acc.is_main_process, step=self.step)
        self.stop_signal = None

    # ------------------------------------------------------------------------------------------------- set-up
    def _datasets(self):
        cfg, pre = self.cfg, self.cfg.preproc
        root = Path(cfg.data.path)
        if not root.is_dir():
            raise UserError(f"data.path {root} does not exist; prepare data with prepare_iam.py, prepare_pages.py "
                            f"or prepare_synthetic.py, or set data.path=DIR")
        train = open_split(cfg, "train", cfg.train.augment, output_frames(cfg.arch.cnn_cfg, pre.image_width))
        if cfg.data.train_fraction != 1:
            train.keep_pages(cfg.data.train_fraction, cfg.seed)
        val = open_split(cfg, "val") if (root / "val").is_dir() else None
        if val is None:
            log.warning("no %s/val split: training without validation (best.pt is not written)", root)
        return train, val

    @staticmethod
    def _workers(requested: int, key: str) -> int:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))                 # this run's processes on this machine
        return worker_count(requested, key, local)

    def _charset(self, resume, init) -> Charset:
        """The training split's characters; a resumed run keeps its checkpoint's, a fine-tuned run adds the
        initial model's (train.init_resize=union). Val characters outside it are reported once."""
        charset = Charset.from_texts(self.train_set.texts)
        if resume is not None:
            check_compatible(resume[0], self.cfg, resume[1], texts=self.train_set.texts)
            charset = Charset(resume[0]["charset"])
        elif init is not None and self.cfg.train.init_resize == "union":
            charset = Charset.from_texts([init[0]["charset"], *self.train_set.texts])
        elif init is not None and self.cfg.train.init_resize != "new":
            raise UserError(f"train.init_resize must be union or new, got {self.cfg.train.init_resize!r}")
        unseen = charset.unknown("".join(self.val_set.texts)) if self.val_set else set()
        if unseen:
            log.warning("%d character(s) of the val split never occur in training and count as errors: %r",
                        len(unseen), "".join(sorted(unseen)))
        return charset

    def _llm(self):
        from htr.llm_assist import LLMLoadError, TapGradients, build_llm_assist
        try:
            width = self.model.tap_width(self.cfg.train.llm_tap)
            assist = build_llm_assist(self.cfg.llm, self.acc.device, feat_dim=width)
        except (ValueError, LLMLoadError) as e:
            raise UserError(str(e)) from None
        self.tap_grads = TapGradients(self.cfg.train.llm_grad_ratio)
        log.info("LLM path: %s, %.2fM trainable parameters (connector%s)", self.cfg.llm.name,
                 sum(p.numel() for p in assist.trainable_parameters()) / 1e6,
                 " + LoRA" if self.cfg.llm.lora.enabled else "")
        if self.cfg.llm.compile:
            log.info("llm.compile: the first step compiles the LM (~1.5 min for SmolLM2 on 2 CPU cores; "
                     "inductor caches it on disk for later runs)")
        return assist

    def _freeze_image_path(self) -> None:
        """train.freeze_image_path: the backbone and the head keep the image model's weights (the backbone its
        BatchNorm statistics too, train_epoch); only the audio branch and the fusion train."""
        cfg = self.cfg
        if not cfg.arch.audio.enabled or not (cfg.train.init_from or cfg.resume):
            raise UserError("train.freeze_image_path=true trains the audio branch beside a trained image model: set "
                            "arch.audio.enabled=true and train.init_from=RUN/best.pt (an image-only run)")
        for name, p in self.model.named_parameters():
            p.requires_grad_(name.startswith(AUDIO_MODULES))

    def _clip_groups(self) -> list:
        """(parameters, learning rate, max gradient norm) of the recognizer and of the connector: each clipped on
        its own, so a large α·L_LLM cannot shrink CTC's step through one global norm."""
        train, groups = self.cfg.train, []
        if not self.frozen:
            groups.append(([p for p in self.model.parameters() if p.requires_grad], train.lr, train.grad_clip))
        if self.llm is not None:
            groups.append((self.llm.trainable_parameters(), train.llm_lr or train.lr, train.llm_grad_clip))
        return groups

    def _run_dir(self, resume) -> Path:
        if resume:
            return Path(resume).resolve().parent
        name = self.cfg.model.run_name or datetime.now().strftime("%Y%m%d-%H%M%S")
        return Path(self.cfg.model.save_dir) / str(name)

    def _restore(self, ckpt: dict, path) -> None:
        missing = [k for k in RESUME_KEYS if k not in ckpt]
        if missing:
            raise UserError(f"checkpoint {path} lacks {', '.join(missing)}: it holds weights only; start a new run "
                            f"from it with train.init_from={path}")
        if (self.llm is not None) != ("llm" in ckpt):
            raise UserError(f"checkpoint {path} was trained {'without' if self.llm else 'with'} the LLM path; "
                            f"resume with train.use_llm={'false' if self.llm else 'true'} or start a new run")
        self.model.load_state_dict(ckpt["ema"]["raw"] if "ema" in ckpt else ckpt["model"])
        if self.ema is not None and "ema" in ckpt:                         # else the average starts afresh
            self.ema.restore(ckpt["model"], ckpt["ema"]["updates"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.llm is not None:
            try:
                self.llm.load_trainable_state_dict(ckpt["llm"]["trainable"])
            except ValueError as e:
                raise UserError(f"checkpoint {path}: {e}") from None
        self.epoch, self.step, self.best_cer = ckpt["epoch"], ckpt["step"], ckpt["best_cer"]
        self.epoch_step, self.bad_validations = ckpt.get("epoch_step", 0), ckpt["bad_validations"]
        torch.set_rng_state(ckpt["rng"]["torch"])
        if torch.cuda.is_available() and "cuda" in ckpt["rng"]:
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
        log.info("resumed from %s at epoch %d, step %d (best val CER %.4f)", path, self.epoch + 1, self.step,
                 self.best_cer)

    def checkpoint_state(self) -> dict:
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        state = {"format": 2, "model": self.acc.unwrap_model(self.model).state_dict(),
                 "charset": self.charset.chars, "arch": to_plain(self.cfg.arch),
                 "preproc": to_plain(self.cfg.preproc), "config": to_plain(self.cfg),
                 "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "epoch": self.epoch, "epoch_step": self.epoch_step, "step": self.step, "best_cer": self.best_cer,
                 "bad_validations": self.bad_validations, "rng": rng, TRAINING_DATA: self.stages}
        if self.ema is not None:                                           # "model" is what ships: the average
            state["ema"] = {"raw": state["model"], "updates": self.ema.updates}
            state["model"] = self.ema.module.state_dict()
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
        stale = remove_stale_temp_files(self.run_dir)
        if stale:
            log.warning("removed %d temporary file(s) left by an interrupted run: %s", len(stale),
                        ", ".join(f.name for f in stale))
        with atomic_write(self.run_dir / "config.yaml", "w") as f:
            f.write(OmegaConf.to_yaml(self.cfg, resolve=True))
        with atomic_write(self.run_dir / "charset.txt", "w") as f:
            f.write(self.charset.chars)
        params = parameter_report(self.acc.unwrap_model(self.model))
        if self.llm is not None:
            params["llm_trainable"] = sum(p.numel() for p in self.acc.unwrap_model(self.llm).trainable_parameters())
        info = {"git_commit": git_commit(), "argv": sys.argv, "torch": torch.__version__,
                "device": str(self.acc.device), "processes": self.acc.num_processes,
                "mixed_precision": self.acc.mixed_precision, "parameters": params,
                "train_lines": len(self.train_set), "val_lines": len(self.val_set) if self.val_set else 0,
                "charset_size": len(self.charset.chars), "init_from": self.cfg.train.init_from or None,
                "data_licence": data_licence(self.cfg.data.path), TRAINING_DATA: self.stages}
        with atomic_write(self.run_dir / "run_info.json", "w") as f:
            json.dump(info, f, indent=2)
        log.info("parameters: %s", ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in params.items()))

    # ------------------------------------------------------------------------------------------------ training
    def _on_signal(self, signum, frame):
        name = signal.Signals(signum).name
        if self.stop_signal is not None:
            log.warning("second %s: exiting now without writing a checkpoint", name)
            raise SystemExit(128 + signum)
        self.stop_signal = signum
        log.warning("%s: stopping after this step and writing last.pt (send it again to exit at once)", name)

    def _stop_requested(self) -> bool:
        """A stop signal or train.max_steps; with several processes, any one's signal stops all at this step."""
        max_steps = self.cfg.train.max_steps
        stop = self.stop_signal is not None or (max_steps > 0 and self.step >= max_steps)
        if self.acc.num_processes > 1:
            stop = bool(self.acc.reduce(torch.tensor([float(stop)], device=self.acc.device), "sum").item())
        return stop

    def loss(self, batch) -> dict:
        """L = L_CTC + shortcut_weight * L_shortcut (+ audio_ctc_weight * the audio shortcut's) + α * L_LLM (align
        stage: L_LLM alone). L_CTC is summed per
        line; `ctc_per_char` (per target character, the scale of L_LLM's per-token mean) is logged beside it, and
        with the audio branch the CTC loss of the lines read from each modality mix (ctc_image, ctc_audio, ...)."""
        images, targets, lengths, texts = batch.images.to(self.acc.device, non_blocking=True), *batch[1:4]
        images = images.contiguous(memory_format=self.fmt)
        masks = self._modalities(batch.audio)
        with torch.set_grad_enabled(not self.frozen):
            out = self.forward(images, batch.audio, *masks)
        losses = {}
        if not self.frozen:
            per_line = ctc_loss(out.logits, targets, lengths, per_line=True)           # (B,)
            losses["ctc"] = per_line.sum() / len(texts)
            losses["ctc_per_char"] = losses["ctc"].detach() * len(texts) / lengths.sum().clamp_min(1)
            if masks:
                losses.update(loss_per_mix(per_line.detach(), mix_names(*masks)))
            if out.shortcut is not None and self.cfg.train.shortcut_weight:
                losses["shortcut"] = ctc_loss(out.shortcut, targets, lengths)
            if out.audio is not None and self.cfg.train.audio_ctc_weight:
                losses["audio_ctc"] = audio_ctc_loss(*out.audio, targets, lengths)
        total = losses.get("ctc", 0.0) + self.cfg.train.shortcut_weight * losses.get("shortcut", 0.0) + \
            self.cfg.train.audio_ctc_weight * losses.get("audio_ctc", 0.0)
        if self.llm is not None:
            # the very tensor the CTC path reads, from the head's hook: accelerate's mixed precision hands the
            # model's outputs back as fp32 copies, whose gradient would be the LLM's alone (TapGradients)
            tap = self.features[self.cfg.train.llm_tap]                     # (B, T, C)
            idx = self.acc.unwrap_model(self.llm).sample_indices(len(texts), self.cfg.train.llm_sample_ratio)
            losses["llm"] = self.llm(self.tap_grads.attach(tap, idx.to(tap.device)), [texts[i] for i in idx.tolist()])
            total = total + (1.0 if self.frozen else self._llm_alpha()) * losses["llm"]
        losses["total"] = total
        return losses

    def _modalities(self, audio) -> tuple:
        """(image_on, audio_on) of this batch's lines by train.modality_dropout; () without readings."""
        if audio is None or not self.acc.unwrap_model(self.model).has_audio:
            return ()
        drop = self.cfg.train.modality_dropout
        return modality_dropout(audio.lengths > 0, drop.image_only, drop.audio_only)

    def _llm_alpha(self) -> float:
        warm = self.cfg.train.llm_alpha_warmup_steps
        return self.cfg.train.llm_alpha * (min(1.0, self.step / warm) if warm else 1.0)

    def _batches(self):
        """The rest of this epoch's batches; a stalled loader worker is an error naming the lines it was on."""
        batches = iter(self.loader)
        for step in range(self.epoch_step, self.sampler.steps_per_epoch):
            try:
                yield next(batches)
            except RuntimeError as e:
                if "timed out" not in str(e):
                    raise
                ids = [self.train_set.ids[i] for i in self.sampler.batch(step)]
                raise UserError(f"no batch from the data loader workers in {self.cfg.data.loader_timeout} s (epoch "
                                f"{self.epoch + 1}, step {step + 1}, lines {', '.join(ids)}); check those images, "
                                f"or debug with train.num_workers=0") from None

    def train_epoch(self) -> dict:
        """The rest of the current epoch; returns mean losses and throughput, or None when stopped before its end."""
        self.model.train(not self.frozen)
        if self.cfg.train.freeze_image_path:
            self.acc.unwrap_model(self.model).backbone.eval()                # its BatchNorm statistics stay
        if self.llm is not None:
            self.llm.train()                                               # connector dropout; the LLM stays eval
        self.sampler.set_epoch(self.epoch, self.epoch_step)
        self.train_set.set_epoch_seed(self.cfg.seed * 1_000_003 + self.epoch)
        steps = self.sampler.steps_per_epoch
        sums, counts, lines, t0 = {}, {}, 0, time.perf_counter()
        bar = tqdm(total=steps, initial=self.epoch_step, desc=f"epoch {self.epoch + 1}", leave=False,
                   disable=not self.acc.is_main_process)
        for batch in self._batches():
            losses, texts = self.loss(batch), batch.texts
            self.optimizer.zero_grad(set_to_none=True)
            self.acc.backward(losses["total"])
            for params, _, max_norm in self.clip_groups:
                if max_norm:
                    self.acc.clip_grad_norm_(params, max_norm)
            self.optimizer.step()
            self.scheduler.step()
            if self.ema is not None:
                self.ema.update(self.acc.unwrap_model(self.model))
            self.step, self.epoch_step, lines = self.step + 1, self.epoch_step + 1, lines + len(texts)
            values = {k: float(v.detach()) for k, v in losses.items()}
            if self.llm is not None and not self.frozen:
                values.update(self.tap_grads.stats)                        # the two gradients at the tap
            for k, v in values.items():
                if not math.isnan(v):                                      # a modality mix this batch lacks
                    sums[k], counts[k] = sums.get(k, 0.0) + v * len(texts), counts.get(k, 0) + len(texts)
            self.runlog.record_step(self.step, {**values, "lr": self.scheduler.get_last_lr()[0]})
            bar.update()
            bar.set_postfix({k: f"{v:.3f}" for k, v in values.items() if k in ("ctc", "llm", "total")},
                            lr=f"{self.scheduler.get_last_lr()[0]:.2e}",
                            lines_s=f"{lines / (time.perf_counter() - t0):.1f}")
            if self.epoch_step < steps and self._stop_requested():
                bar.close()
                return None
        bar.close()
        stats = {f"train_{k}": v / counts[k] for k, v in sums.items()}
        stats.update(lines_per_s=lines / (time.perf_counter() - t0), lr=self.scheduler.get_last_lr()[0])
        return stats

    def validate(self, model=None) -> dict:
        """Greedy CER/WER of `model` (default: the trained weights) on the val split; with several processes each
        validates every N-th line, and the edit counts are summed, so every line counts exactly once."""
        model = (model or self.acc.unwrap_model(self.model)).eval()
        rank, n = self.acc.process_index, self.acc.num_processes
        shard = Subset(self.val_set, range(rank, len(self.val_set), n))
        loader = line_loader(shard, self.charset, batch_size=self.cfg.eval.batch_size,
                             workers=self._workers(self.cfg.eval.num_workers, "eval.num_workers"))
        dtype = autocast_dtype(self.acc.mixed_precision, self.acc.device)      # validate as we train
        out = predict(model, loader, self.charset, self.fmt == torch.channels_last, dtype)
        counts = {**error_counts(out["refs"], out["hyps"], self.cfg.eval.wer_mode), "lines": len(out["refs"])}
        if n > 1:
            summed = self.acc.reduce(torch.tensor(list(counts.values()), dtype=torch.float64,
                                                  device=self.acc.device), "sum")
            counts = dict(zip(counts, (int(v) for v in summed.tolist())))
        metrics = rates(counts)
        return {"val_cer": metrics["cer"], "val_wer": metrics["wer"], "val_lines": counts["lines"]}

    @torch.no_grad()
    def validate_llm(self) -> dict:
        """Does the prefix carry the line? On the first train.llm_val_lines val lines: L_LLM, the LM's loss on the
        text alone and with another line's prefix (nats per token), the prefix's RMS over the LM's embedding RMS,
        and the reading test: the CER of what the frozen LM writes from the prefix alone."""
        model, assist = self.acc.unwrap_model(self.model).eval(), self.acc.unwrap_model(self.llm).eval()
        lines = Subset(self.val_set, range(min(self.cfg.train.llm_val_lines, len(self.val_set))))
        feats, texts = [], []
        for batch in line_loader(lines, self.charset, batch_size=self.cfg.eval.batch_size):
            with self.acc.autocast():
                out = model(batch.images.to(self.acc.device).contiguous(memory_format=self.fmt), batch.audio)
            feats.append(out.features[self.cfg.train.llm_tap].float())
            texts += batch.texts
        feats = torch.cat(feats)                                           # (N, T, C)
        stats = assist.diagnostics(feats, texts)
        longest = max(len(ids) for ids in assist.lm.encode(texts))
        reading = assist.read(feats, max_new_tokens=longest + 8)
        stats["reading_cer"] = corpus_cer(texts, reading)
        log.info("LLM on %d val lines: L_LLM %.3f, text only %.3f, shuffled prefix %.3f; reading test CER %.4f "
                 "(e.g. %r for %r)", len(texts), stats["llm"], stats["llm_text_only"], stats["llm_shuffled"],
                 stats["reading_cer"], reading[0], texts[0])
        return {f"val_{k}": v for k, v in stats.items()}

    def _after_epoch(self, stats: dict) -> bool:
        """Validate / save as scheduled; returns True when early stopping says to stop. best.pt is the lowest val
        CER, in the align stage the lowest val L_LLM (the recognizer's CER does not change there)."""
        cfg = self.cfg.train
        last = self.epoch == cfg.num_epochs
        if self.val_set is not None and (self.epoch % cfg.val_every_k_epochs == 0 or last):
            stats.update(self.validate(self.ema and self.ema.module))     # the weights that ship
            if self.ema is not None:
                stats.update(val_cer_raw=self.validate()["val_cer"])
            if self.llm is not None and cfg.llm_val_lines > 0:
                stats.update(self.validate_llm())
            score = stats["val_llm"] if self.frozen else stats["val_cer"]
            if score < self.best_cer:
                self.best_cer, self.bad_validations = score, 0
                self.save("best.pt")
            else:
                self.bad_validations += 1
            log.info("epoch %d: val CER %.4f WER %.4f (best %s %.4f)", self.epoch, stats["val_cer"],
                     stats["val_wer"], "L_LLM" if self.frozen else "CER", self.best_cer)
        self.runlog.record(self.epoch, self.step, stats)          # before last.pt: a resumed run redoes and rewrites
        if self.epoch % cfg.save_every_k_epochs == 0 or last or "val_cer" in stats:
            self.save("last.pt")
        patience = cfg.early_stopping_patience
        return patience > 0 and self.bad_validations >= patience

    def fit(self) -> Path:
        self.write_run_info()
        handlers = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}
        try:
            while self.epoch < self.cfg.train.num_epochs and not self._stop_requested():
                stats = self.train_epoch()
                if stats is None:
                    break
                self.epoch, self.epoch_step = self.epoch + 1, 0
                log.info("epoch %d: loss %.4f, %.1f lines/s", self.epoch, stats["train_total"], stats["lines_per_s"])
                if self._after_epoch(stats):
                    log.info("early stopping: no better val CER in %d validations", self.bad_validations)
                    break
            path = self.save("last.pt")
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)
            self.runlog.close()
        if self.stop_signal is not None:
            log.warning("interrupted in epoch %d after step %d; resume with resume=%s", self.epoch + 1, self.step,
                        path)
        return path


def train(cfg) -> int:
    """Train the run of `cfg` (continuing resume= when given); returns the exit status: 0, or 128 + the signal
    that stopped it."""
    resume = (load_checkpoint(cfg.resume), cfg.resume) if cfg.resume else None
    trainer = Trainer(cfg, resume)
    path = trainer.fit()
    log.info("done: %s", path)
    return 0 if trainer.stop_signal is None else 128 + trainer.stop_signal

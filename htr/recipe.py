"""The training recipe's arithmetic: the learning-rate schedule and the config of a stage (joint, or align: the
connector alone on a frozen recognizer)."""
import math

from omegaconf import OmegaConf

from utils import UserError


def lr_factor(step: int, steps_per_epoch: int, cfg_train) -> float:
    """Linear warm-up, then 'mstep' (x0.1 at 50% and 75% of the optimizer steps), 'cosine' or 'none'."""
    warm = min(1.0, (step + 1) / cfg_train.warmup_steps) if cfg_train.warmup_steps else 1.0
    total = cfg_train.num_epochs * steps_per_epoch
    if cfg_train.scheduler == "mstep":
        return warm * 0.1 ** sum(step >= f * total for f in (0.5, 0.75))
    if cfg_train.scheduler == "cosine":
        return warm * 0.5 * (1 + math.cos(math.pi * min(1.0, step / total)))
    if cfg_train.scheduler == "none":
        return warm
    raise UserError(f"train.scheduler must be mstep, cosine or none, got {cfg_train.scheduler!r}")


def stage_config(cfg):
    """train.stage=align: the connector alone, on a frozen recognizer, every line through the LM, with the align.*
    budget and learning rate; the returned config is what the run records. train.stage=joint: cfg as it is."""
    stage = cfg.train.stage
    if stage == "joint":
        return cfg
    if stage != "align":
        raise UserError(f"train.stage must be joint or align, got {stage!r}")
    if not (cfg.train.init_from or cfg.resume):
        raise UserError("train.stage=align trains the connector on a trained recognizer, which stays frozen: give "
                        "train.init_from=RUN/best.pt (or resume= an align run's last.pt)")
    if cfg.train.llm_val_lines <= 0:
        raise UserError("train.stage=align keeps as best.pt the connector with the lowest val L_LLM: set "
                        "train.llm_val_lines > 0 (e.g. 64)")
    align = {"use_llm": True, "llm_sample_ratio": 1.0, "num_epochs": cfg.align.num_epochs, "llm_lr": cfg.align.lr,
             "warmup_steps": cfg.align.warmup_steps}
    return OmegaConf.merge(cfg, {"train": align})

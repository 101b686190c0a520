"""What a run records, in its directory: per-step training losses (train_steps.csv, append-only), per-epoch metrics
(metrics.csv, rewritten atomically), TensorBoard scalars, and learning_curve.png (smoothed per-step losses above,
with the LLM path's validation losses; validation CER below, and the LLM reading test's); and the commit it ran
from (git_commit, for run_info.json)."""
import csv
import logging
import subprocess
from pathlib import Path

import numpy as np

from utils import atomic_write

log = logging.getLogger("htr")
SMOOTHED_POINTS = 40              # the plot's per-step losses are averaged over len/40 steps
COUNTS = ("epoch", "step", "val_lines")
LLM_VAL_CURVES = (("val_llm", "o-", "val L_LLM"), ("val_llm_shuffled", "x--", "val, another line's prefix"),
                  ("val_llm_text_only", "s:", "val, text alone"))


def git_commit() -> str:
    """HEAD of the repository this code runs from, "-dirty" with uncommitted changes; "unknown" outside git."""
    try:
        here = Path(__file__).resolve().parents[1]                    # the repository
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=here, capture_output=True, text=True).stdout
        return commit.stdout.strip() + ("-dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def read_rows(path: Path, key: str) -> list:
    """The numeric rows of a CSV that have `key`. Rows a crash cut short or a hand damaged are dropped with a
    warning, never the run."""
    if not path.is_file():
        return []
    rows, bad = [], 0
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        for row in csv.DictReader(f):
            try:
                rows.append({k: (int if k in COUNTS else float)(float(v)) for k, v in row.items()
                             if k is not None and v not in ("", None)})
            except ValueError:
                bad += 1
    kept = [r for r in rows if key in r]
    if bad or len(kept) < len(rows):
        log.warning("%s: ignored %d unreadable row(s)", path, bad + len(rows) - len(kept))
    return kept


def write_rows(path: Path, rows: list) -> None:
    with atomic_write(path, "w") as f:
        writer = csv.DictWriter(f, list(dict.fromkeys(k for row in rows for k in row)))
        writer.writeheader()
        writer.writerows(rows)


def smooth(values, points: int = SMOOTHED_POINTS) -> np.ndarray:
    """Trailing moving average over len/points steps (so any run length shows about that many wiggles)."""
    window = max(1, len(values) // points)
    sums = np.cumsum(np.insert(np.asarray(values, float), 0, 0.0))
    ends = np.arange(1, len(values) + 1)
    starts = np.maximum(0, ends - window)
    return (sums[ends] - sums[starts]) / (ends - starts)


class RunLog:
    """A resumed run continues the files of its directory from its checkpoint's step (later rows, written after
    that checkpoint, are redone and replaced). Only the first process of a run writes (`enabled`)."""

    def __init__(self, run_dir: Path, enabled: bool = True, step: int = 0):
        self.run_dir, self.enabled = Path(run_dir), enabled
        self.csv_path, self.steps_path = self.run_dir / "metrics.csv", self.run_dir / "train_steps.csv"
        self.rows, self.steps, self.writer, self.steps_file = [], [], None, None
        if not enabled:
            return
        self.rows = [r for r in read_rows(self.csv_path, "epoch") if r["step"] <= step]
        self.steps = [r for r in read_rows(self.steps_path, "step") if r["step"] <= step]
        if self.steps_path.is_file():
            write_rows(self.steps_path, self.steps)
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(self.run_dir / "tensorboard", purge_step=step + 1 if step else None)

    def record_step(self, step: int, losses: dict) -> None:
        """One optimizer step's losses (and lr), appended to train_steps.csv and TensorBoard."""
        if not self.enabled:
            return
        row = {"step": step, **losses}
        if self.steps_file is None:
            new = not self.steps_path.is_file() or self.steps_path.stat().st_size == 0
            self.steps_file = open(self.steps_path, "a", newline="", encoding="utf-8")
            self.steps_writer = csv.DictWriter(self.steps_file, list(row))
            if new:
                self.steps_writer.writeheader()
        self.steps_writer.writerow(row)
        self.steps_file.flush()
        self.steps.append(row)
        for key, value in losses.items():
            self.writer.add_scalar(f"step/{key}", value, step)

    def record(self, epoch: int, step: int, stats: dict) -> None:
        """An epoch's summary (mean losses, throughput, validation) in metrics.csv and TensorBoard."""
        if not self.enabled:
            return
        self.rows = [r for r in self.rows if r["epoch"] < epoch] + [{"epoch": epoch, "step": step, **stats}]
        for key, value in stats.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()
        write_rows(self.csv_path, self.rows)
        if "val_cer" in stats:
            self.plot()

    def plot(self) -> None:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True)
        steps = [r["step"] for r in self.steps]
        for i, key in enumerate(k for k in ("ctc", "llm") if any(k in r for r in self.steps)):
            xs, ys = zip(*[(r["step"], r[key]) for r in self.steps if key in r])
            top.plot(xs, ys, color=f"C{i}", alpha=0.25, linewidth=0.5)
            top.plot(xs, smooth(ys), color=f"C{i}", label=f"L_{key.upper()} (smoothed)")
        for key, style, label in LLM_VAL_CURVES:                        # the LLM path's val losses, nats per token
            val = [r for r in self.rows if key in r]
            if val:
                top.plot([r["step"] for r in val], [r[key] for r in val], style, color="C1", label=label)
        top.set_yscale("log")
        top.set_ylabel("loss per step (L_LLM: nats per token)")
        if top.lines:                                                   # no steps logged yet: no legend
            top.legend(loc="upper right", fontsize="small")
        for key, color, label in (("val_cer", "C2", "recognizer (greedy)"), ("val_reading_cer", "C3",
                                                                              "reading test (LM from the prefix)")):
            val = [r for r in self.rows if key in r]
            bottom.plot([r["step"] for r in val], [100 * r[key] for r in val], "o-", color=color, label=label)
            for r in val[-1:]:
                bottom.annotate(f"{100 * r[key]:.1f} %", (r["step"], 100 * r[key]),
                                textcoords="offset points", xytext=(0, 6), ha="center")
        if any("val_reading_cer" in r for r in self.rows):
            bottom.legend(loc="upper right", fontsize="small")
        bottom.set_ylabel("validation CER (%)")
        bottom.set_xlabel("optimizer step")
        bottom.set_xlim(0, max(steps + [r["step"] for r in self.rows if "val_cer" in r] + [1]))
        fig.tight_layout()
        fig.savefig(self.run_dir / "learning_curve.png", dpi=100)
        plt.close(fig)

    def close(self) -> None:
        if self.steps_file is not None:
            self.steps_file.close()
        if self.writer is not None:
            self.writer.close()

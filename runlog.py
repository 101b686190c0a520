"""Per-epoch metrics of a run: metrics.csv, TensorBoard scalars and a learning-curve PNG, all in the run directory."""
import csv
import logging
from pathlib import Path

from utils import atomic_write

log = logging.getLogger("htr")


class RunLog:
    def __init__(self, run_dir: Path, enabled: bool = True):
        self.run_dir, self.enabled = Path(run_dir), enabled
        self.csv_path = self.run_dir / "metrics.csv"
        self.rows = self._read_rows() if enabled else []
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(self.run_dir / "tensorboard")

    def _read_rows(self) -> list:
        """Earlier rows of a resumed run, so the curve and the CSV continue. The file is written atomically, but
        one edited or damaged by hand loses only its unreadable rows (with a warning), never the run."""
        if not self.csv_path.is_file():
            return []
        rows, bad = [], 0
        with open(self.csv_path, newline="", encoding="utf-8", errors="replace") as f:
            for row in csv.DictReader(f):
                try:
                    rows.append({k: float(v) for k, v in row.items() if k is not None and v not in ("", None)})
                except ValueError:
                    bad += 1
        rows = [r for r in rows if "epoch" in r]
        if bad:
            log.warning("%s: ignored %d unreadable row(s)", self.csv_path, bad)
        return rows

    def record(self, epoch: int, step: int, stats: dict) -> None:
        if not self.enabled:
            return
        self.rows = [r for r in self.rows if r["epoch"] < epoch] + [{"epoch": epoch, "step": step, **stats}]
        for key, value in stats.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()
        keys = list(dict.fromkeys(k for row in self.rows for k in row))
        with atomic_write(self.csv_path, "w") as f:
            writer = csv.DictWriter(f, keys)
            writer.writeheader()
            writer.writerows(self.rows)
        if "val_cer" in stats:
            self.plot()

    def plot(self) -> None:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot([r["epoch"] for r in self.rows], [r["train_total"] for r in self.rows], label="train loss")
        ax.set_xlabel("epoch")
        ax.set_ylabel("train loss")
        val = [r for r in self.rows if "val_cer" in r]
        ax2 = ax.twinx()
        ax2.plot([r["epoch"] for r in val], [100 * r["val_cer"] for r in val], "o-", color="C1", label="val CER")
        ax2.set_ylabel("val CER (%)")
        fig.legend(loc="upper right")
        fig.tight_layout()
        fig.savefig(self.run_dir / "learning_curve.png", dpi=100)
        plt.close(fig)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

"""The run's records: per-step losses (append-only, crash-tolerant), per-epoch metrics, the learning curve."""
import csv

import cv2

from htr import training
from conftest import ROOT
from htr.runlog import read_rows
from utils import load_checkpoint, load_config


def run(overrides, resume=None):
    cfg = load_config(ROOT / "config.yaml", overrides + ([f"resume={resume}"] if resume else []))
    t = training.Trainer(cfg, (load_checkpoint(resume), resume) if resume else None)
    return t, t.fit()


def test_steps_are_logged_once_each_across_a_crash_and_a_resume(tiny_overrides):
    t, last = run(tiny_overrides + ["train.num_epochs=2"])                 # 8 lines, batch 4: 4 steps
    steps_csv = t.run_dir / "train_steps.csv"
    rows = read_rows(steps_csv, "step")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert set(rows[0]) == {"step", "ctc", "ctc_per_char", "shortcut", "total", "lr"}
    assert rows[0]["ctc"] > rows[-1]["ctc"]
    with open(steps_csv, "a") as f:                                       # a killed run went on past last.pt
        f.write("5,1.0,0.1,1.0,1.1,0.003\n6,0.9,")                            # ... and died mid-line
    t, _ = run(tiny_overrides + ["train.num_epochs=3"], resume=last)
    with open(steps_csv, newline="") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [1, 2, 3, 4, 5, 6]
    assert [r["epoch"] for r in read_rows(t.run_dir / "metrics.csv", "epoch")] == [1, 2, 3]


def test_learning_curve_has_a_loss_and_a_cer_panel(tiny_overrides):
    t, _ = run(tiny_overrides + ["train.num_epochs=2"])
    image = cv2.imread(str(t.run_dir / "learning_curve.png"))
    assert image.shape[:2] == (650, 800)
    t.runlog.rows, t.runlog.steps = [], []
    t.runlog.plot()                                                        # nothing to draw yet: still a figure
    assert cv2.imread(str(t.run_dir / "learning_curve.png")) is not None

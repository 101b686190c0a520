"""Several processes, as users scale out (`accelerate launch`): 2 CPU processes over gloo."""
import csv
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, WORDS, tiny_setup, write_split
from htr.evaluation import evaluate
from utils import load_checkpoint, load_config


def test_two_processes_train_one_model_with_one_writer(tmp_path):
    root, overrides = tiny_setup(tmp_path, "ddp")
    write_split(root, "val", WORDS[5:])                                 # 5 lines: shards of 3 and 2
    overrides += ["train.num_epochs=2", "train.batch_size=2", "train.scheduler=mstep", "train.augment=true",
                  "train.mixed_precision=no", "eval.mixed_precision=no", "train.num_workers=1"]
    out = tmp_path / "weights"
    out.mkdir()
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(ROOT / "tests" / "ddp_driver.py"), str(ROOT / "config.yaml"), str(out), *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0, rank1 = (torch.load(out / f"rank{r}.pt") for r in (0, 1))
    params = [k for k in rank0 if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert len(params) > 50
    for key in params:                                                  # one model, kept in sync (DDP broadcasts
        assert torch.equal(rank0[key], rank1[key]), key                 # BatchNorm statistics from rank 0)

    run_dir = tmp_path / "runs" / "ddp"
    last = load_checkpoint(run_dir / "last.pt")
    assert last["step"] == 4                                            # 4 batches an epoch, 2 per process
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(float(r["epoch"])) for r in rows] == [1, 2]             # one writer
    assert [int(float(r["val_lines"])) for r in rows] == [5, 5]         # every val line exactly once
    assert float(rows[-1]["lr"]) == pytest.approx(3e-5)                 # mstep counted in steps after sharding
    assert len(list((run_dir / "tensorboard").iterdir())) == 1
    assert not list(run_dir.glob(".*.tmp*")) and len(list((root / "train").glob(".cache-*.npz"))) == 1
    best_epoch = min(rows, key=lambda r: float(r["val_cer"]))
    report = evaluate(load_config(ROOT / "config.yaml", overrides + ["eval.split=val"]), run_dir / "best.pt")
    assert report["lines"] == 5 and abs(report["cer"] - float(best_epoch["val_cer"])) < 1e-9

"""Stopping and crashing: signals, kill -9 at any moment, a full disk, damaged checkpoints. A run must always be
resumable from its last complete checkpoint, with parseable metrics and no temp files left, and workers must never
outlive the trainer."""
import csv
import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from htr import training
from conftest import ROOT, tiny_setup
from utils import RESUME_KEYS, UserError, load_checkpoint, load_config, save_checkpoint

LONG_RUN = ["train.num_epochs=1000", "train.batch_size=1", "train.num_workers=2", "train.val_every_k_epochs=1",
            "train.save_every_k_epochs=1", "train.augment=true"]


def children(pid: int) -> set:
    """Process ids whose parent is `pid` (from /proc)."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.add(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_for(condition, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.1)


def start(args, code: str = None) -> subprocess.Popen:
    """trainer.py (or `code` with sys.argv = args) in a subprocess, in its own process group."""
    cmd = [sys.executable, "trainer.py", "config.yaml", *args] if code is None else \
        [sys.executable, "-c", textwrap.dedent(code), "config.yaml", *args]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def resume_and_finish(overrides, run_dir: Path, epochs: int) -> dict:
    """Resume from last.pt up to `epochs` (in this process); the run must finish cleanly with its temp files
    cleaned up and its metrics complete. Returns the final checkpoint."""
    last = run_dir / "last.pt"
    cfg = load_config(ROOT / "config.yaml", overrides + [f"train.num_epochs={epochs}", f"resume={last}"])
    training.Trainer(cfg, (load_checkpoint(last), last)).fit()
    assert not list(run_dir.glob(".*.tmp*")), "temp files left behind"
    assert metrics_epochs(run_dir) == list(range(1, epochs + 1))
    return load_checkpoint(run_dir / "last.pt", RESUME_KEYS)


def test_sigterm_mid_epoch_writes_last_pt_workers_exit_and_the_run_resumes(tmp_path):
    _, overrides = tiny_setup(tmp_path)
    run_dir = tmp_path / "runs" / "tiny"
    proc = start(overrides + LONG_RUN)
    wait_for(lambda: (run_dir / "last.pt").is_file() and children(proc.pid), 120, "the first epoch and workers")
    workers = children(proc.pid)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "SIGTERM: stopping after this step" in err and "resume with resume=" in err
    wait_for(lambda: not any(alive(w) for w in workers), 10, "the loader workers to exit")
    ckpt = load_checkpoint(run_dir / "last.pt", RESUME_KEYS)
    assert ckpt["step"] == 8 * ckpt["epoch"] + ckpt["epoch_step"]          # 8 lines, batch 1: 8 steps an epoch
    final = resume_and_finish(overrides + LONG_RUN, run_dir, ckpt["epoch"] + 1)
    assert final["step"] == 8 * (ckpt["epoch"] + 1)


def test_a_second_signal_exits_at_once(tiny_overrides):
    t = training.Trainer(load_config(ROOT / "config.yaml", tiny_overrides))
    t._on_signal(signal.SIGINT, None)
    assert t.stop_signal == signal.SIGINT
    with pytest.raises(SystemExit) as info:
        t._on_signal(signal.SIGINT, None)
    assert info.value.code == 128 + signal.SIGINT


def test_kill_9_mid_epoch_leaves_no_workers_and_a_resumable_run(tmp_path):
    _, overrides = tiny_setup(tmp_path)
    run_dir = tmp_path / "runs" / "tiny"
    proc = start(overrides + LONG_RUN)
    wait_for(lambda: (run_dir / "last.pt").is_file() and children(proc.pid), 120, "the first epoch and workers")
    time.sleep(0.5)
    workers = children(proc.pid)
    proc.kill()
    proc.communicate(timeout=30)
    wait_for(lambda: not any(alive(w) for w in workers), 10, "the orphaned workers to die")
    epoch = load_checkpoint(run_dir / "last.pt", RESUME_KEYS)["epoch"]
    resume_and_finish(overrides + LONG_RUN, run_dir, epoch + 1)


DIE_WHILE_WRITING = """
    import csv, os, signal, sys, torch
    from htr import training
    from utils import load_config

    calls, save, writerows = [0], torch.save, csv.DictWriter.writerows

    def dying(write):
        def write_or_die(obj, target):
            calls[0] += 1
            if calls[0] == {kill_at}:                  # SIGKILL half-way through writing this file
                if hasattr(target, "write"):
                    target.write(b"half a checkpoint")
                    target.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            return write(obj, target)
        return write_or_die

    if "{what}" == "checkpoint":
        torch.save = dying(save)
    else:                                           # the header is written; the rows never are
        csv.DictWriter.writerows = dying(writerows)
    training.Trainer(load_config(sys.argv[1], sys.argv[2:])).fit()
"""


def metrics_epochs(run_dir: Path) -> list:
    with open(run_dir / "metrics.csv", newline="") as f:
        return [int(float(row["epoch"])) for row in csv.DictReader(f)]


@pytest.mark.parametrize("what", ["checkpoint", "metrics"])
def test_kill_9_while_writing_keeps_the_last_complete_files(tmp_path, what):
    _, overrides = tiny_setup(tmp_path)
    run_dir = tmp_path / "runs" / "tiny"
    args = overrides + ["train.num_epochs=4", "train.save_every_k_epochs=1"]
    proc = start(args, DIE_WHILE_WRITING.format(what=what, kill_at=3))
    proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL
    assert list(run_dir.glob(".*.tmp*")), "the kill should have left a half-written temp file"
    epoch = load_checkpoint(run_dir / "last.pt", RESUME_KEYS)["epoch"]     # the last complete checkpoint
    assert metrics_epochs(run_dir) in (list(range(1, epoch + 1)), list(range(1, epoch + 2)))
    resume_and_finish(args, run_dir, 4)


def disk_full_after(calls: int, monkeypatch):
    real_save, count = torch.save, [0]

    def save(obj, f):
        count[0] += 1
        if count[0] > calls:
            f.write(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_save(obj, f)
    monkeypatch.setattr(torch, "save", save)


def test_disk_full_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"a": torch.ones(2)}, path)
    disk_full_after(0, monkeypatch)
    with pytest.raises(UserError, match=r"cannot write checkpoint .*last.pt: No space left on device; the "
                                        r"previous checkpoint \(if any\) is kept"):
        save_checkpoint({"a": torch.zeros(2)}, path)
    assert torch.load(path)["a"].equal(torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]              # no temp file


def test_disk_full_during_training_stops_with_one_message(tiny_overrides, tmp_path, monkeypatch):
    t = training.Trainer(load_config(ROOT / "config.yaml", tiny_overrides + ["train.num_epochs=3"]))
    disk_full_after(2, monkeypatch)                                        # epoch 1: best.pt, last.pt
    with pytest.raises(UserError, match="No space left on device"):
        t.fit()
    monkeypatch.undo()
    assert load_checkpoint(t.run_dir / "last.pt", RESUME_KEYS)["epoch"] == 1
    assert not list(t.run_dir.glob(".*.tmp*"))


def test_truncated_and_key_missing_checkpoints_are_one_message(tiny_overrides, tmp_path):
    t = training.Trainer(load_config(ROOT / "config.yaml", tiny_overrides + ["train.num_epochs=1"]))
    last = t.fit()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    with pytest.raises(UserError, match=f"cannot read checkpoint {truncated} .truncated or not a checkpoint"):
        load_checkpoint(truncated)
    keyless = tmp_path / "keyless.pt"
    torch.save({"model": {}}, keyless)
    with pytest.raises(UserError, match=f"checkpoint {keyless} lacks charset, arch, preproc"):
        load_checkpoint(keyless)
    weights_only = tmp_path / "weights.pt"
    torch.save({k: v for k, v in load_checkpoint(last).items() if k in ("model", "charset", "arch", "preproc")},
               weights_only)
    with pytest.raises(UserError, match="lacks optimizer, scheduler.*start a new run from it with train.init_from"):
        training.Trainer(load_config(ROOT / "config.yaml", tiny_overrides + [f"resume={weights_only}"]),
                        (load_checkpoint(weights_only), weights_only))
    proc = subprocess.run([sys.executable, "evaluate.py", "config.yaml", *tiny_overrides, f"resume={truncated}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: cannot read checkpoint {truncated}")

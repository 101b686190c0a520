"""ablate.py: LLM-off vs LLM-on (tiny local Llama), one seed, fine-tuned from a checkpoint, interrupted by Ctrl-C and
resumed, runs side by side, table and curves written."""
import contextlib
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from htr.ablation import HEARTBEAT_S, bootstrap_ci, exit_reason, parse_arms
from conftest import ROOT, tiny_setup
from htr.llm_weights import write_tiny
from htr.runlog import read_rows
from utils import UserError


def ablate(args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "ablate.py", "config.yaml", *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


def test_two_arms_are_trained_evaluated_and_resumed_after_an_interruption(tmp_path):
    _, overrides = tiny_setup(tmp_path)
    write_tiny("tiny-llama", tmp_path / "llama")
    out = tmp_path / "ablation"
    init = subprocess.run([sys.executable, "trainer.py", "config.yaml", *overrides, "train.max_steps=1",
                           f"model.save_dir={tmp_path / 'init'}", "model.run_name=init"], cwd=ROOT, capture_output=True)
    assert init.returncode == 0, init.stderr[-2000:]
    args = [*overrides, f"train.init_from={tmp_path / 'init' / 'init' / 'last.pt'}", "train.num_epochs=12",
            "train.val_every_k_epochs=4", f"llm.name={tmp_path / 'llama'}",
            "llm.num_queries=8", "llm.qformer_layers=1", "--seeds", "1", "--out", str(out)]
    first = ablate(args)
    steps = out / "runs" / "llm_on_s1" / "train_steps.csv"
    end = time.monotonic() + 300
    while not steps.is_file() and first.poll() is None and time.monotonic() < end:
        time.sleep(0.1)
    os.killpg(first.pid, signal.SIGINT)              # Ctrl-C (its whole process group), mid-training of the LLM-on arm
    _, err = first.communicate(timeout=120)
    assert first.returncode == 2 and "run the same command again to resume" in err, err[-2000:]
    finished = (out / "runs" / "llm_off_s1" / "best.pt").stat().st_mtime_ns

    second = ablate(args)
    table, err = second.communicate(timeout=600)
    assert second.returncode == 0, err[-3000:]
    assert "resuming llm_on_s1" in err and "llm_off_s1" not in err                      # finished: kept
    assert (out / "runs" / "llm_off_s1" / "best.pt").stat().st_mtime_ns == finished    # not trained again
    assert [r["step"] for r in read_rows(steps, "step")] == list(range(1, 25))         # resumed, not restarted
    assert "| llm_off | greedy | 1 |" in table and "| llm_on | greedy | 1 |" in table
    with open(out / "ablation.csv", newline="") as f:
        off, on = [{k: float(v) for k, v in r.items() if k.startswith(("test_cer", "delta", "ci95"))}
                   for r in csv.DictReader(f)]
    assert 0 <= off["test_cer"] <= 1.5 and 0 <= on["test_cer"] <= 1.5 and off["delta_vs_llm_off"] == 0
    assert on["delta_vs_llm_off"] == pytest.approx(on["test_cer"] - off["test_cer"])
    assert on["ci95_low"] <= on["delta_vs_llm_off"] <= on["ci95_high"]
    assert (out / "val_curves.png").stat().st_size > 1000


def test_jobs_train_runs_side_by_side(tmp_path):
    _, overrides = tiny_setup(tmp_path)
    write_tiny("tiny-llama", tmp_path / "llama")
    out = tmp_path / "ablation"
    run = ablate([*overrides, "train.num_epochs=4", "train.val_every_k_epochs=2", f"llm.name={tmp_path / 'llama'}",
                  "llm.num_queries=8", "llm.qformer_layers=1", "--seeds", "1", "--jobs", "2", "--out", str(out)])
    table, err = run.communicate(timeout=600)
    assert run.returncode == 0, err[-3000:]
    order = [line.split(" INFO ")[-1] for line in err.splitlines()
             if " INFO training " in line or " INFO finished " in line]
    assert order[:2] == ["training llm_off_s1", "training llm_on_s1"], order        # both started before either ended
    assert sorted(o.split(" (")[0] for o in order[2:]) == ["finished llm_off_s1", "finished llm_on_s1"], order
    assert "| llm_off | greedy | 1 |" in table and "| llm_on | greedy | 1 |" in table
    for arm in ("llm_off", "llm_on"):
        steps = read_rows(out / "runs" / f"{arm}_s1" / "train_steps.csv", "step")
        assert [r["step"] for r in steps] == list(range(1, 9))


def trainers_of(out) -> list:
    """Pids of the trainer.py processes training under `out` (Linux /proc)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:                                                  # exited meanwhile
            continue
        if any(a.endswith(b"trainer.py") for a in args) and any(str(out).encode() in a for a in args):
            pids.append(int(cmdline.parent.name))
    return pids


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")
def test_a_killed_ablation_stops_its_trainers_with_a_checkpoint(tmp_path):
    _, overrides = tiny_setup(tmp_path)
    out = tmp_path / "ablation"
    run = ablate([*overrides, "train.num_epochs=500", "--seeds", "1", "--out", str(out)])
    steps = out / "runs" / "llm_off_s1" / "train_steps.csv"
    end = time.monotonic() + 300
    while not steps.is_file() and run.poll() is None and time.monotonic() < end:
        time.sleep(0.1)
    assert trainers_of(out), "the trainer did not start"
    partial = out / "runs" / "llm_off_s1" / "partial.json"
    end = time.monotonic() + 30
    while not partial.is_file() and time.monotonic() < end:
        time.sleep(0.1)
    run.kill()                                       # SIGKILL: ablate.py cannot pass a signal on
    run.communicate(timeout=60)
    end = time.monotonic() + 120
    while trainers_of(out) and time.monotonic() < end:
        time.sleep(0.2)
    left = trainers_of(out)
    for pid in left:                                 # none left behind, even when the test fails
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert not left, "the trainer outlived its ablate.py"
    last = torch.load(out / "runs" / "llm_off_s1" / "last.pt", map_location="cpu", weights_only=False)
    assert last["step"] == read_rows(steps, "step")[-1]["step"] > 0          # stopped with its latest step saved
    assert json.loads(partial.read_text())["train_seconds"] > HEARTBEAT_S    # its wall time so far, for the table


def test_exit_reasons_are_words():
    assert exit_reason(128 + signal.SIGINT) == "stopped by SIGINT"
    assert exit_reason(-signal.SIGKILL) == "killed by SIGKILL"
    assert exit_reason(1) == "exit status 1"


def test_bootstrap_interval_covers_a_clear_difference():
    lengths = np.full(200, 20.0)
    base = np.full(200, 4.0)                                             # 20 % CER
    better = base - np.random.default_rng(0).integers(1, 3, 200)         # about 7.5 points better on every line
    low, high = bootstrap_ci(better, base, lengths)
    assert low < high < 0 and low > -0.1
    low, high = bootstrap_ci(base, base, lengths)
    assert low == high == 0


def test_arm_specs_are_checked():
    assert parse_arms(["a1:train.use_llm=true,train.llm_alpha=0.1"])["a1"] == ["train.use_llm=true",
                                                                               "train.llm_alpha=0.1"]
    for bad in ["noparts", "x:", "x:novalue", "llm_on:train.lr=1"]:
        with pytest.raises(UserError, match="--arm"):
            parse_arms([bad])


def test_a_bad_setting_in_any_arm_stops_before_the_first_run_trains(tmp_path):
    _, overrides = tiny_setup(tmp_path)
    out = tmp_path / "ablation"
    for bad in (["decode.mode=bean"], ["--arm", "a1:train.lerning_rate=1"], ["--jobs", "0"]):
        run = ablate([*overrides, "--seeds", "1", "--out", str(out), *bad])
        _, err = run.communicate(timeout=120)
        assert run.returncode != 0 and ("decode.mode" in err or "lerning_rate" in err or "--jobs 0" in err), err[-2000:]
        assert "Traceback" not in err and not (out / "runs").exists()

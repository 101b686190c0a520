"""benchmark.py: one JSON report with the baseline, the tuned path, onnxruntime, the LLM path and consistent ratios."""
import json
import shutil
import subprocess
import sys

import pytest

import benchmark
from conftest import ROOT, TINY, tiny_setup
from htr.llm_weights import write_tiny
from utils import UserError


def test_benchmark_prints_consistent_json(tmp_path):
    write_tiny("tiny-llama", tmp_path / "llm")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmark.py"), str(ROOT / "config.yaml"), *TINY,
                           f"llm.name={tmp_path / 'llm'}", "--steps", "1", "--llm"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    base, tuned = report["baseline"], report["tuned"]
    assert set(base) == set(tuned) == {"train_lines_per_s", "eval_lines_per_s", "demo_ms_per_line"}
    assert all(v > 0 for v in [*base.values(), *tuned.values()])
    assert abs(report["speedup"]["eval_lines_per_s"] - tuned["eval_lines_per_s"] / base["eval_lines_per_s"]) < 1e-9
    assert abs(report["speedup"]["demo_ms_per_line"] - base["demo_ms_per_line"] / tuned["demo_ms_per_line"]) < 1e-9
    assert report["parameters"]["total"] == report["parameters"]["backbone"] + report["parameters"]["head"]
    assert report["image"] == [32, 256] and report["forward_gflop_per_line"] > 0
    onnx = report["onnxruntime"]
    assert onnx["eval_lines_per_s_fp32"] > 0 and onnx["eval_lines_per_s_int8"] > 0
    int8_ratio = onnx["eval_lines_per_s_int8"] / base["eval_lines_per_s"]
    assert abs(onnx["eval_speedup_vs_baseline"]["int8"] - int8_ratio) < 1e-9
    llm = report["llm"]                           # LLM path on vs off, timed in alternating rounds
    assert llm["rounds"] == 3 and llm["llm_parameters"] > 0 and llm["connector_parameters"] > 0
    ratio = llm["train_lines_per_s_llm_off"] / llm["train_lines_per_s_llm_on"]
    assert abs(llm["step_time_ratio_on_vs_off"] - ratio) < 1e-9 and ratio > 0


def test_benchmark_times_the_fused_path_with_the_audio_branch():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmark.py"), str(ROOT / "config.yaml"), *TINY,
                           "arch.audio.enabled=true", "arch.audio.channels=8", "arch.audio.hidden=16",
                           "arch.audio.heads=2", "--steps", "1"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    params = report["parameters"]
    assert report["reading_s"] == 3.0 and params["audio"] > 0
    assert params["total"] == params["backbone"] + params["head"] + params["audio"]
    assert report["tuned"]["train_lines_per_s"] > 0 and set(report["onnxruntime"]) == \
        {"eval_lines_per_s_fp32", "eval_speedup_vs_baseline"}


def test_loader_benchmark_reports_each_worker_count(tmp_path):
    root, _ = tiny_setup(tmp_path)
    proc = subprocess.run([sys.executable, str(ROOT / "benchmark.py"), str(ROOT / "config.yaml"), *TINY,
                           f"data.path={root}", "--loader", "0,2", "--loader-lines", "8"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loader = json.loads(proc.stdout)["loader"]
    assert loader["train_lines"] == 8 and loader["lines_per_s_0_workers"] > 0 and loader["lines_per_s_2_workers"] > 0


def test_bad_input_is_one_line_not_a_traceback(monkeypatch):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmark.py"), str(ROOT / "config.yaml"), "train.nosuch=1"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: unknown config key 'train.nosuch'")
    assert "Traceback" not in proc.stderr
    monkeypatch.setattr(shutil, "which", lambda name: None)             # --compile on a CPU without a C++ compiler
    monkeypatch.setattr(sys, "argv", ["benchmark.py", str(ROOT / "config.yaml"), *TINY, "--compile"])
    with pytest.raises(UserError, match="--compile builds C\\+\\+ code.*no C\\+\\+ compiler.*leave out --compile"):
        benchmark.main()


def test_contention_benchmark_reports_busy_over_alone_for_each_thread_choice():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmark.py"), str(ROOT / "config.yaml"), *TINY,
                           "train.num_workers=1", "--contention", "--steps", "1"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)["contention"]
    usable = report["usable_cpus"]
    assert report["trainer"]["threads"] == max(1, usable - 1) and report["all_cpus"]["threads"] == usable
    for choice in ("trainer", "all_cpus"):
        r = report[choice]
        assert r["alone_lines_per_s"] > 0 and r["busy_lines_per_s"] > 0
        assert r["busy_over_alone"] == pytest.approx(r["busy_lines_per_s"] / r["alone_lines_per_s"], abs=0.01)
    assert "while True: pass" not in subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout

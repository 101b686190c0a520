"""The three commands end to end, as a user runs them (subprocess), on a dataset the test writes."""
import csv
import json
import re
import shutil
import subprocess
import sys

import cv2
import pytest

from conftest import ROOT, in_colour, tiny_setup
from htr.evaluation import data_name
from utils import UserError


def run(script, *args, ok=True):
    proc = subprocess.run([sys.executable, str(ROOT / script), str(ROOT / "config.yaml"), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    if ok:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def report_file(best, root, ext="json"):
    """evaluate.py's report on the test split of `root`, beside the checkpoint `best`."""
    return best.parent / f"eval_{data_name(root)}_test.{ext}"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny run shared by the CLI tests: (overrides, checkpoint, data root)."""
    tmp = tmp_path_factory.mktemp("cli")
    root, overrides = tiny_setup(tmp, "cli", test_texts=["ab", "abz"])  # 'z' is not in the charset
    run("trainer.py", *overrides, "train.num_epochs=2")
    return overrides, tmp / "runs" / "cli" / "best.pt", root


def test_train_writes_run_directory(trained):
    _, best, _ = trained
    run_dir = best.parent
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["parameters"]["total"] > 0 and re.fullmatch(r"[0-9a-f]{40}(-dirty)?", info["git_commit"])
    assert (run_dir / "last.pt").is_file() and (run_dir / "metrics.csv").read_text().count("\n") == 3


def test_evaluate_reports_and_handles_unknown_chars(trained):
    overrides, best, root = trained
    proc = run("evaluate.py", *overrides, f"resume={best}")
    assert "test (greedy): CER" in proc.stdout
    assert "not in the model's charset" in proc.stderr and "'z'" in proc.stderr
    report = json.loads(report_file(best, root).read_text())
    assert report["lines"] == 2 and report["unknown_chars"] == "z"
    assert report["data_path"] == str(root.resolve()) and report["split"] == "test" and report["runtime"] == "torch"
    assert report["decode"] == {"mode": "greedy"} and report["model"]["path"] == str(best.resolve())
    assert report["model"]["charset_size"] == 4 and report["model"]["epoch"] in (1, 2) and report["model"]["step"] > 0
    assert report_file(best, root, "csv").read_text().startswith("id,errors,cer,confidence,")
    with open(report_file(best, root, "csv"), newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["reference"] for r in rows) == ["ab", "abz"]
    errors = sum(int(r["errors"]) for r in rows)
    assert errors >= 1 and report["cer"] == pytest.approx(errors / 5)  # 'z' is always wrong; 5 reference chars


def test_demo_prints_text_confidence_and_ground_truth(trained, tmp_path):
    overrides, best, root = trained
    colour = tmp_path / "colour.jpg"
    cv2.imwrite(str(colour), in_colour(cv2.imread(str(root / "test" / "test-000.png"), cv2.IMREAD_GRAYSCALE)))
    proc = run("demo.py", *overrides, f"resume={best}", str(root / "test" / "test-000.png"), str(colour))
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(str(root / "test" / "test-000.png") + "\t")
    assert 0.0 <= float(lines[0].split("\t")[2]) <= 1.0
    assert lines[1].endswith("\tab\t(ground truth)")
    assert lines[2].startswith(str(colour))


def test_demo_unreadable_file_is_one_clear_line(trained, tmp_path):
    overrides, best, _ = trained
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    proc = run("demo.py", *overrides, f"resume={best}", str(bad), ok=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {bad}: unreadable")
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("script", ["evaluate.py", "demo.py"])
def test_bad_eval_precision_is_one_line(trained, script):
    overrides, best, root = trained
    images = [str(next((root / "test").glob("*.png")))] if script == "demo.py" else []
    proc = run(script, *overrides, f"resume={best}", "eval.mixed_precision=fp8", *images, ok=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last == "error: eval.mixed_precision must be auto, no, bf16 or fp16, got 'fp8'"


@pytest.mark.parametrize("args,message", [
    (["train.lrr=1"], "unknown config key 'train.lrr'"),
    (["resume=/nonexistent/best.pt"], "checkpoint not found: /nonexistent/best.pt"),
])
def test_cli_errors_are_one_line(args, message):
    proc = run("evaluate.py", *args, ok=False)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


def test_evaluate_rejects_checkpoint_of_other_architecture(trained):
    overrides, best, _ = trained
    proc = run("evaluate.py", *overrides, f"resume={best}", "arch.rnn_layers=3", ok=False)
    assert "arch.rnn_layers: checkpoint 2 vs config 3" in proc.stderr and "Traceback" not in proc.stderr


def evaluate_in_process(capsys, *args):
    """evaluate.py's main in this process (the subprocess round trips above cover the CLI itself)."""
    import evaluate
    evaluate.main([str(ROOT / "config.yaml"), *args])
    return capsys.readouterr().out


def test_reports_are_named_after_their_data(trained, tmp_path, capsys):
    overrides, best, root = trained
    other = tmp_path / "other" / "lines"
    shutil.copytree(root, other)
    evaluate_in_process(capsys, *overrides, f"resume={best}", f"data.path={other}")
    assert data_name(other) == "other_lines" and data_name("./data/IAM/processed_lines") == "IAM_processed_lines"
    assert json.loads(report_file(best, other).read_text())["data_path"] == str(other.resolve())
    assert report_file(best, root) != report_file(best, other)


def test_evaluate_beam_with_lm_reports_both_and_tunes_on_val(trained, capsys, caplog):
    overrides, best, root = trained
    with caplog.at_level("INFO", logger="htr"):
        out = evaluate_in_process(capsys, *overrides, f"resume={best}", "decode.mode=beam", "decode.build_lm=true",
                                  "decode.tune=true", "decode.lm_order=3", "decode.workers=1")
    assert "test (greedy): CER" in out and "test (beam): CER" in out
    assert "tune on val" in caplog.text
    report = json.loads(report_file(best, root).read_text())
    assert report["beam_settings"]["val_tuning"] and report["cer"] == report["beam"]["cer"]
    assert set(report["confidence"]) == {"cer_lowest_confidence_decile", "cer_other_lines"}
    assert (best.parent / "char_lm.json.gz").is_file()
    again = evaluate_in_process(capsys, *overrides, f"resume={best}", "decode.mode=beam", "decode.workers=1")
    assert "test (beam): CER" in again                                 # reuses the saved LM


def test_evaluate_counts_lm_text_lines_of_the_evaluated_splits(trained, tmp_path, capsys, caplog):
    overrides, best, root = trained
    text = tmp_path / "corpus.txt"
    text.write_text("ab\n  abc \nabz\ncab dab\nab\n", encoding="utf-8")     # test: ab, abz; val: abc, bcd
    with caplog.at_level("WARNING", logger="htr"):
        evaluate_in_process(capsys, *overrides, f"resume={best}", "decode.mode=beam", "decode.build_lm=true",
                            "decode.tune=true", "decode.lm_order=3", "decode.workers=1", f"decode.lm_text={text}",
                            f"decode.lm_path={tmp_path / 'lm.json.gz'}")
    report = json.loads(report_file(best, root).read_text())
    assert report["beam_settings"]["lm_text_overlap"] == {"test": 2, "val": 1}
    assert f"2 of the 2 test lines occur verbatim in decode.lm_text {text}" in caplog.text
    assert f"1 of the 2 val lines occur verbatim in decode.lm_text {text}" in caplog.text and "'abc'" in caplog.text


def test_evaluate_bad_lm_file_is_clear(trained, tmp_path):
    overrides, best, _ = trained
    bad = tmp_path / "lm.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match=str(bad)):
        evaluate_in_process(None, *overrides, f"resume={best}", "decode.mode=beam", f"decode.lm_path={bad}")


def test_evaluate_llm_rescoring_reports_three_decodings(trained, tmp_path, capsys):
    from htr.llm_weights import write_tiny
    overrides, best, root = trained
    write_tiny("tiny-llama", tmp_path / "tiny-llama")
    out = evaluate_in_process(capsys, *overrides, f"resume={best}", "decode.mode=beam", "decode.build_lm=true",
                              "decode.lm_order=3", "decode.workers=1", "decode.llm_rescore=true",
                              f"llm.name={tmp_path / 'tiny-llama'}")
    assert "test (llm): CER" in out
    report = json.loads(report_file(best, root).read_text())
    assert report["decoding"] == "llm" and "beta" in report["beam_settings"]["llm_rescore"]
    with pytest.raises(UserError, match="add decode.mode=beam"):
        evaluate_in_process(capsys, *overrides, f"resume={best}", "decode.llm_rescore=true")

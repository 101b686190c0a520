"""ONNX export: parity with PyTorch, the OnnxRecognizer contract, metadata, the CLI and its errors."""
import subprocess
from pathlib import Path
import sys

import numpy as np
import onnx
import pytest
import torch

import conftest
import export
from htr import onnx_export
from conftest import ROOT
from htr.decoding import greedy_decode
from htr.onnx_runtime import OnnxRecognizer, load_recognizer
from htr.training import Trainer
from htr.inference import line_log_probs, load_model
from utils import UserError, load_config

CONFIG = ROOT / "config.yaml"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny model trained one epoch in-process and exported by export.main: (overrides, model, charset, onnx)."""
    tmp = tmp_path_factory.mktemp("export")
    _, overrides = conftest.tiny_setup(tmp, "onnx")
    overrides.append("train.num_epochs=1")
    Trainer(load_config(CONFIG, overrides)).fit()
    best = tmp / "runs" / "onnx" / "best.pt"
    overrides.append(f"resume={best}")
    export.main([str(CONFIG), *overrides])
    model, charset, _ = load_model(load_config(CONFIG, overrides), best)
    return overrides, model, charset, best.parent / "model.onnx"


def test_onnx_matches_pytorch_on_batch_sizes_1_and_3(exported):
    _, model, _, path = exported
    assert onnx_export.parity(model, OnnxRecognizer(path), batch_sizes=(1, 3)) < 1e-4


def test_recognizer_has_the_line_log_probs_contract(exported):
    _, model, charset, path = exported
    recognizer = OnnxRecognizer(path)
    images = torch.rand(3, 1, recognizer.image_height, recognizer.image_width)
    ours, ref = recognizer.log_probs(images), line_log_probs(model, images)
    assert len(ours) == len(ref) == 3
    for a, b in zip(ours, ref):
        assert a.dtype == b.dtype == np.float32 and a.shape == b.shape and a.ndim == 2
        assert np.abs(a - b).max() < 1e-4
        assert greedy_decode(a, recognizer.charset) == greedy_decode(b, charset)


def test_metadata_round_trip(exported):
    overrides, _, charset, path = exported
    cfg = load_config(CONFIG, overrides)
    recognizer = OnnxRecognizer(path)
    assert recognizer.charset.chars == charset.chars and len(recognizer.charset) == len(charset)
    assert (recognizer.image_height, recognizer.image_width) == (cfg.preproc.image_height, cfg.preproc.image_width)


def test_cli_writes_the_named_file_and_summary(exported, tmp_path):
    overrides, _, _, _ = exported
    out = tmp_path / "cli.onnx"
    proc = subprocess.run([sys.executable, str(ROOT / "export.py"), str(CONFIG), *overrides, str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out.is_file() and proc.stdout.startswith(f"{out}: ") and "max abs log-prob diff" in proc.stdout


@pytest.fixture(scope="module")
def int8(exported, tmp_path_factory):
    """export.main with export.int8=true, calibrated on 6 train lines: (overrides, stdout, int8 path)."""
    overrides, _, _, _ = exported
    out = tmp_path_factory.mktemp("int8") / "model.int8.onnx"
    proc = subprocess.run([sys.executable, str(ROOT / "export.py"), str(CONFIG), *overrides, "export.int8=true",
                           "export.calib_lines=6", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return overrides, proc.stdout, out


def test_int8_export_quantizes_the_convolutions_and_keeps_the_metadata(int8, exported):
    _, stdout, path = int8
    assert stdout.startswith(f"{path}: ") and "int8 convolutions calibrated on 6 lines of train" in stdout
    graph = onnx.load(str(path))
    ops = {node.op_type for node in graph.graph.node}
    int8_weights = [t for t in graph.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4]
    convs = [n for n in onnx.load(str(exported[3])).graph.node if n.op_type == "Conv"]
    assert {"QuantizeLinear", "DequantizeLinear", "LSTM"} <= ops and len(int8_weights) == len(convs)
    assert OnnxRecognizer(path).charset.chars == exported[2].chars


def test_int8_model_stays_close_to_fp32(int8, exported):
    _, _, path = int8
    _, model, _, _ = exported
    recognizer = OnnxRecognizer(path)
    gen = torch.Generator().manual_seed(1)
    images = torch.rand(3, 1, recognizer.image_height, recognizer.image_width, generator=gen)
    for q, ref in zip(recognizer.log_probs(images), line_log_probs(model, images)):
        assert q.shape == ref.shape
        assert np.abs(np.exp(q) - np.exp(ref)).mean() < 0.01          # mean abs difference of the posteriors


def test_int8_calibration_on_a_missing_split_is_a_clear_error(exported):
    overrides, _, _, _ = exported
    cfg = load_config(CONFIG, overrides + ["export.calib_split=nosuch"])
    with pytest.raises(UserError, match="nosuch"):
        onnx_export.calibration_feeds(cfg)


def test_corrupt_or_foreign_onnx_is_a_clear_error(exported, tmp_path):
    _, _, _, path = exported
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a protobuf" * 10)
    with pytest.raises(UserError, match=str(bad)):
        OnnxRecognizer(bad)
    with pytest.raises(UserError, match="not found"):
        OnnxRecognizer(tmp_path / "missing.onnx")
    graph = onnx.load(str(path))
    del graph.metadata_props[:]
    foreign = tmp_path / "foreign.onnx"
    onnx.save(graph, str(foreign))
    with pytest.raises(UserError, match="lacks the metadata"):
        OnnxRecognizer(foreign)


def test_wrong_image_size_is_a_clear_error(exported):
    _, _, _, path = exported
    with pytest.raises(UserError, match="takes images"):
        OnnxRecognizer(path).log_probs(torch.rand(1, 1, 16, 64))


def test_load_recognizer_picks_the_runtime_and_checks_sizes(exported):
    overrides, _, charset, path = exported
    cfg = load_config(CONFIG, overrides)
    _, torch_charset = load_recognizer(cfg, cfg.resume, "torch")
    recognizer, onnx_charset = load_recognizer(cfg, path, "onnx")
    assert isinstance(recognizer, OnnxRecognizer) and torch_charset.chars == onnx_charset.chars == charset.chars
    with pytest.raises(UserError, match="was exported for 32x256"):
        load_recognizer(load_config(CONFIG, overrides + ["preproc.image_height=64"]), path, "onnx")
    with pytest.raises(UserError, match="runtime must be torch or onnx"):
        load_recognizer(cfg, path, "tensorrt")


def test_evaluate_and_demo_run_on_onnx_like_on_torch(exported):
    from htr.inference import transcribe
    from htr import evaluation
    overrides, _, _, path = exported
    root = Path(load_config(CONFIG, overrides).data.path)
    torch_report = evaluation.evaluate(load_config(CONFIG, overrides + ["eval.split=val"]), overrides[-1][7:])
    onnx_cfg = load_config(CONFIG, overrides + ["eval.split=val", "runtime=onnx", f"resume={path}"])
    onnx_report = evaluation.evaluate(onnx_cfg, path)
    assert onnx_report["greedy"] == torch_report["greedy"]
    model, charset = load_recognizer(onnx_cfg, path, "onnx")
    texts = transcribe(model, charset, [(root / "val" / "val-000.png", None)], onnx_cfg)
    assert isinstance(texts[0][0], str) and 0.0 <= texts[0][1] <= 1.0

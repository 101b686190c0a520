"""Training behaviour: overfitting, resume equivalence, interruption, checkpoints, bad input."""
import signal

import pytest
import torch

import trainer
from conftest import ROOT, write_split
from evaluate import evaluate
from utils import UserError, load_checkpoint, load_config

CONFIG = ROOT / "config.yaml"


def train(overrides, resume=None):
    cfg = load_config(CONFIG, overrides)
    ckpt = (load_checkpoint(resume), resume) if resume else None
    t = trainer.Trainer(cfg, ckpt)
    return t, t.fit()


def test_overfits_a_few_lines_to_zero_cer(tiny_overrides):
    overrides = tiny_overrides + ["train.batch_size=8", "train.num_epochs=150", "train.val_every_k_epochs=50",
                                  "train.save_every_k_epochs=1000"]
    t, last = train(overrides)
    first, final = t.runlog.rows[0]["train_total"], t.runlog.rows[-1]["train_total"]
    assert final < first / 20
    report = evaluate(load_config(CONFIG, overrides + ["eval.split=train"]), last)
    assert report["cer"] == 0.0, report


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_resume_gives_identical_weights(tiny_overrides, tmp_path, precision):
    base = tiny_overrides + ["train.num_epochs=2", "train.augment=true", "train.scheduler=mstep",
                             "train.warmup_steps=3", f"train.mixed_precision={precision}"]
    _, straight = train(base + ["model.run_name=straight"])
    _, half = train(base + ["model.run_name=split", "train.max_steps=2"])   # 8 lines / batch 4 = 1 epoch
    assert load_checkpoint(half)["epoch"] == 1
    _, resumed = train(base + ["model.run_name=split", f"resume={half}"], resume=half)
    a, b = load_checkpoint(straight), load_checkpoint(resumed)
    assert a["step"] == b["step"] == 4
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert a["optimizer"]["state"][0]["exp_avg"].equal(b["optimizer"]["state"][0]["exp_avg"])


def test_checkpoint_is_plain_data_and_has_run_files(tiny_overrides):
    t, last = train(tiny_overrides + ["train.num_epochs=1"])
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["charset"] == "abcd" and ckpt["epoch"] == 1
    for name in ("config.yaml", "charset.txt", "run_info.json", "metrics.csv", "learning_curve.png", "best.pt"):
        assert (t.run_dir / name).is_file(), name
    assert not list(t.run_dir.glob(".*.tmp*"))


def test_signal_writes_emergency_checkpoint(tiny_overrides, monkeypatch):
    cfg = load_config(CONFIG, tiny_overrides + ["train.num_epochs=5", "train.batch_size=2"])
    t = trainer.Trainer(cfg)
    loss = t.loss

    def loss_then_signal(*args):
        if t.step == 1:
            t._on_signal(signal.SIGTERM, None)
        return loss(*args)

    monkeypatch.setattr(t, "loss", loss_then_signal)
    path = t.fit()
    ckpt = load_checkpoint(path)
    assert (ckpt["step"], ckpt["epoch"]) == (2, 0)          # stopped mid-epoch 1, epoch to redo = 0


def test_resume_rejects_other_charset(tiny_overrides, tmp_path):
    _, last = train(tiny_overrides + ["train.num_epochs=1"])
    other = tmp_path / "other"
    write_split(other, "train", ["xyz", "zyx"])
    with pytest.raises(UserError, match="another character set.*'xyz'"):
        train(tiny_overrides + [f"data.path={other}", f"resume={last}"], resume=last)


def test_resume_rejects_other_architecture(tiny_overrides):
    _, last = train(tiny_overrides + ["train.num_epochs=1"])
    with pytest.raises(UserError, match="arch.rnn_hidden_size: checkpoint 32 vs config 64"):
        train(tiny_overrides + ["arch.rnn_hidden_size=64"], resume=last)


def test_missing_resume_path_is_clear(tmp_path):
    with pytest.raises(UserError, match="checkpoint not found: .*nope.pt"):
        load_checkpoint(tmp_path / "nope.pt")


def test_corrupt_checkpoint_is_clear(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read checkpoint .*bad.pt"):
        load_checkpoint(bad)


def test_empty_split_is_clear(tiny_overrides, tiny_data):
    (tiny_data / "train" / "gt.txt").write_text("")
    with pytest.raises(UserError, match="no valid lines in .*train"):
        train(tiny_overrides)


def test_missing_data_path_is_clear(tiny_overrides, tmp_path):
    with pytest.raises(UserError, match="data.path .*nowhere does not exist"):
        train(tiny_overrides + [f"data.path={tmp_path / 'nowhere'}"])

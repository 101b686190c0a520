"""Training behaviour: overfitting, resume equivalence, interruption, checkpoints, bad input."""
import signal

import pytest
import torch

from htr import training
from conftest import ROOT, write_split
from htr.evaluation import evaluate
from htr.recipe import lr_factor
from utils import UserError, load_checkpoint, load_config

CONFIG = ROOT / "config.yaml"


def train(overrides, resume=None):
    cfg = load_config(CONFIG, overrides)
    ckpt = (load_checkpoint(resume), resume) if resume else None
    t = training.Trainer(cfg, ckpt)
    return t, t.fit()


def test_overfits_a_few_lines_to_zero_cer(tiny_overrides):
    overrides = tiny_overrides + ["train.batch_size=8", "train.num_epochs=150", "train.val_every_k_epochs=50",
                                  "train.save_every_k_epochs=1000"]
    t, last = train(overrides)
    first, final = t.runlog.rows[0]["train_total"], t.runlog.rows[-1]["train_total"]
    assert final < first / 20
    report = evaluate(load_config(CONFIG, overrides + ["eval.split=train"]), last)
    assert report["cer"] == 0.0, report


def assert_same_weights(a_path, b_path) -> None:
    a, b = load_checkpoint(a_path), load_checkpoint(b_path)
    assert a["step"] == b["step"]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert ("ema" in a) == ("ema" in b)
    for key in a.get("ema", {}).get("raw", {}):                            # the trained weights behind the average
        assert torch.equal(a["ema"]["raw"][key], b["ema"]["raw"][key]), key
    assert a["optimizer"]["state"][0]["exp_avg"].equal(b["optimizer"]["state"][0]["exp_avg"])


REGULARISED = ["train.ema_decay=0.9", "train.drop_path=0.3"]


@pytest.mark.parametrize("precision,stop_at,workers,extra", [("no", 2, 0, []), ("no", 3, 2, []), ("bf16", 5, 0, []),
                                                            ("no", 3, 0, REGULARISED)])
def test_resume_at_any_step_gives_identical_weights(tiny_overrides, precision, stop_at, workers, extra):
    """2 epochs of 2 steps straight == stopped after `stop_at` steps (mid-epoch for 3) + resumed, with
    augmentation, dropout, warm-up and mstep decay, in the loader's main process or its workers; and with the
    weight average and stochastic depth."""
    base = tiny_overrides + ["train.num_epochs=3", "train.augment=true", "train.scheduler=mstep",
                             "train.warmup_steps=3", f"train.mixed_precision={precision}",
                             f"train.num_workers={workers}", *extra]
    _, straight = train(base + ["model.run_name=straight"])
    _, half = train(base + ["model.run_name=split", f"train.max_steps={stop_at}"])
    stopped = load_checkpoint(half)
    assert (stopped["epoch"], stopped["epoch_step"]) == divmod(stop_at, 2)
    _, resumed = train(base + ["model.run_name=split", f"resume={half}"], resume=half)
    assert load_checkpoint(resumed)["step"] == 6
    assert_same_weights(straight, resumed)


def test_checkpoint_is_plain_data_and_has_run_files(tiny_overrides):
    t, last = train(tiny_overrides + ["train.num_epochs=1"])
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["charset"] == "abcd" and ckpt["epoch"] == 1
    for name in ("config.yaml", "charset.txt", "run_info.json", "metrics.csv", "learning_curve.png", "best.pt"):
        assert (t.run_dir / name).is_file(), name
    assert not list(t.run_dir.glob(".*.tmp*"))


def test_signal_writes_an_emergency_checkpoint_that_resumes_mid_epoch(tiny_overrides, monkeypatch):
    base = tiny_overrides + ["train.num_epochs=2", "train.batch_size=2", "train.augment=true"]
    _, straight = train(base + ["model.run_name=straight"])
    t = training.Trainer(load_config(CONFIG, base))
    loss = t.loss

    def loss_then_signal(*args):
        if t.step == 1:
            t._on_signal(signal.SIGTERM, None)
        return loss(*args)

    monkeypatch.setattr(t, "loss", loss_then_signal)
    path = t.fit()
    assert t.stop_signal == signal.SIGTERM
    ckpt = load_checkpoint(path)
    assert (ckpt["step"], ckpt["epoch"], ckpt["epoch_step"]) == (2, 0, 2)    # after step 2 of epoch 1's 4
    _, resumed = train(base + [f"resume={path}"], resume=path)
    assert_same_weights(straight, resumed)


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


def test_charset_comes_from_the_training_split_only(tiny_overrides, tiny_data, caplog):
    write_split(tiny_data, "val", ["abz", "zz"])
    with caplog.at_level("WARNING", logger="htr"):
        t = training.Trainer(load_config(CONFIG, tiny_overrides))
    assert t.charset.chars == "abcd"
    assert caplog.text.count("never occur in training") == 1 and "'z'" in caplog.text
    stats = t.validate()
    assert stats["val_lines"] == 2 and stats["val_cer"] >= 3 / 5          # the three z's are errors


def test_lr_schedule_counts_optimizer_steps(tiny_overrides):
    t, _ = train(tiny_overrides + ["train.num_epochs=1", "train.batch_size=1", "train.scheduler=mstep"])
    lrs = [t.cfg.train.lr * lr_factor(s, 8, t.cfg.train) for s in range(8)]
    assert lrs == pytest.approx([3e-3] * 4 + [3e-4] * 2 + [3e-5] * 2)      # x0.1 at 50 % and 75 % of 8 steps
    assert t.runlog.rows[-1]["lr"] == pytest.approx(3e-5)


def test_init_from_copies_shared_characters_and_starts_new_ones_fresh(tiny_overrides, tmp_path):
    _, first = train(tiny_overrides + ["train.num_epochs=2"])
    other = tmp_path / "other"
    write_split(other, "train", ["abx", "xba", "ab"])
    write_split(other, "val", ["ax"])
    overrides = tiny_overrides + [f"data.path={other}", f"train.init_from={first}", "model.run_name=ft",
                                  "train.num_epochs=1"]
    t = training.Trainer(load_config(CONFIG, overrides))
    assert t.charset.chars == "abcdx"                                      # union: old a-d + new x
    old, new = load_checkpoint(first)["model"], t.model.state_dict()
    for key in ("head.fc.3.weight", "head.fc.3.bias", "head.shortcut.weight"):
        assert torch.equal(new[key][:5], old[key])                         # blank, a, b, c, d copied
        assert not torch.equal(new[key][5], torch.zeros_like(new[key][5]))  # x: fresh initialisation
    assert torch.equal(new["backbone.features.0.weight"], old["backbone.features.0.weight"])
    assert t.step == 0 and t.optimizer.state_dict()["state"] == {}         # not its optimizer or schedule
    t.fit()
    only_new = training.Trainer(load_config(CONFIG, overrides + ["train.init_resize=new", "model.run_name=ft2"]))
    assert only_new.charset.chars == "abx"
    assert torch.equal(only_new.model.state_dict()["head.fc.3.weight"][1:3], old["head.fc.3.weight"][1:3])


def test_init_from_another_architecture_names_what_differs(tiny_overrides):
    _, first = train(tiny_overrides + ["train.num_epochs=1"])
    with pytest.raises(UserError, match=r"another architecture: arch.rnn_hidden_size: checkpoint 32 vs config 16"):
        training.Trainer(load_config(CONFIG, tiny_overrides + [f"train.init_from={first}", "arch.rnn_hidden_size=16",
                                                              "model.run_name=ft"]))
    with pytest.raises(UserError, match="init_from starts a new run .* resume= continues"):
        training.Trainer(load_config(CONFIG, tiny_overrides + [f"train.init_from={first}", f"resume={first}"]),
                        (load_checkpoint(first), first))

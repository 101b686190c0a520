"""Regularisation for small corpora: the weight average (train.ema_decay) and stochastic depth (train.drop_path)."""
import pytest
import torch
import torch.nn as nn

from conftest import ROOT
from htr import training
from htr.weight_ema import WeightEMA, warm_decay
from models import BasicBlock, HTRNet, drop_path
from utils import UserError, load_checkpoint, load_config

CONFIG = ROOT / "config.yaml"


def test_decay_warms_up_to_its_setting():
    assert warm_decay(0.999, 0) == pytest.approx(0.1)
    assert warm_decay(0.999, 90) == pytest.approx(0.91)
    assert warm_decay(0.999, 10**6) == 0.999


def test_average_follows_its_formula():
    model = nn.Linear(3, 2)
    ema = WeightEMA(model, 0.9)
    expected = None
    for n in range(4):
        with torch.no_grad():
            model.weight.add_(1.0)
        w = model.weight.detach().clone()
        d = warm_decay(0.9, n)
        expected = w if expected is None else d * expected + (1 - d) * w   # the first update copies
        ema.update(model)
        assert torch.allclose(ema.module.weight, expected)
    assert ema.updates == 4 and not ema.module.weight.requires_grad


def test_a_run_validates_and_ships_the_average(tiny_overrides):
    cfg = load_config(CONFIG, tiny_overrides + ["train.num_epochs=2", "train.ema_decay=0.5"])
    t = training.Trainer(cfg)
    last = load_checkpoint(t.fit())
    rows = [r for r in t.runlog.rows if "val_cer" in r]
    assert rows and all("val_cer_raw" in r for r in rows)
    raw = t.model.state_dict()
    for key, value in t.ema.module.state_dict().items():
        assert torch.equal(last["model"][key], value), key                # "model" is what evaluate/export load
        assert torch.equal(last["ema"]["raw"][key], raw[key]), key
    assert last["ema"]["updates"] == t.step
    assert any(not torch.equal(last["model"][k], raw[k]) for k in raw if raw[k].is_floating_point())


@pytest.mark.parametrize("override,message", [("train.ema_decay=1.5", r"train\.ema_decay must be in \(0, 1\)"),
                                              ("train.drop_path=1.5", r"train\.drop_path must be in \[0, 1\)"),
                                              ("train.drop_path=-0.1", r"train\.drop_path must be in \[0, 1\)")])
def test_a_bad_setting_names_the_key(tiny_overrides, override, message):
    with pytest.raises(UserError, match=message):
        training.Trainer(load_config(CONFIG, tiny_overrides + [override]))


def test_drop_path_drops_whole_lines_and_keeps_the_mean():
    torch.manual_seed(0)
    x = torch.ones(4000, 3, 2, 2)
    y = drop_path(x, 0.25, training=True)
    per_line = y.flatten(1)
    assert torch.equal(per_line.min(1).values, per_line.max(1).values)    # a line is dropped whole or kept whole
    assert torch.allclose(per_line[:, 0].unique(), torch.tensor([0.0, 4 / 3]))
    assert y.mean().item() == pytest.approx(1.0, abs=0.05)
    assert drop_path(x, 0.25, training=False) is x and drop_path(x, 0.0, training=True) is x


def test_drop_path_rises_over_the_blocks_and_keeps_checkpoints_compatible(tiny_overrides):
    cfg = load_config(CONFIG, tiny_overrides)
    plain, dropped = HTRNet(cfg.arch, 5), HTRNet(cfg.arch, 5, drop_path=0.2)
    rates = [m.drop for m in dropped.modules() if isinstance(m, BasicBlock)]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.2) and rates == sorted(rates)
    assert {k: v.shape for k, v in plain.state_dict().items()} == {k: v.shape for k, v in dropped.state_dict().items()}
    dropped.load_state_dict(plain.state_dict())
    x = torch.rand(2, 1, cfg.preproc.image_height, cfg.preproc.image_width)
    assert torch.equal(plain.eval()(x).logits, dropped.eval()(x).logits)   # inference is unchanged

"""The LLM path inside the trainer: L = L_CTC + alpha * L_LLM, checkpoints, resume, and the LLM-off path."""
import sys

import pytest
import torch

from htr import training
from conftest import ROOT, WORDS
from htr.llm_weights import write_tiny
from utils import UserError, load_checkpoint, load_config


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("llm") / "tiny-llama"
    write_tiny("tiny-llama", path)
    return path


def make(overrides, resume=None):
    cfg = load_config(ROOT / "config.yaml", overrides)
    return training.Trainer(cfg, (load_checkpoint(resume), resume) if resume else None)


def test_llm_loss_is_logged_and_only_the_connector_is_saved(tiny_overrides, tiny_llama):
    t = make(tiny_overrides + ["train.use_llm=true", f"llm.name={tiny_llama}", "llm.num_queries=8",
                               "train.num_epochs=2", "train.llm_sample_ratio=0.5"])
    frozen = {k: v.clone() for k, v in t.llm.lm.model.state_dict().items()}
    assert frozen
    last = t.fit()
    row = t.runlog.rows[-1]
    assert row["train_llm"] > 0 and row["train_total"] > row["train_ctc"]
    ckpt = load_checkpoint(last)
    assert ckpt["llm"]["name"] == str(tiny_llama)
    assert all(k.startswith("connector.") for k in ckpt["llm"]["trainable"])
    assert not any("lm." in k for k in ckpt["model"])
    for k, v in t.llm.lm.model.state_dict().items():                # the LLM itself never changed
        assert torch.equal(frozen[k], v), k
    resumed = make(tiny_overrides + ["train.use_llm=true", f"llm.name={tiny_llama}", "llm.num_queries=8",
                                     "train.num_epochs=3", f"resume={last}"], resume=last)
    for k, v in resumed.llm.connector.state_dict().items():
        assert torch.equal(v.cpu(), ckpt["llm"]["trainable"][f"connector.{k}"]), k


def test_quick_llm_preset_trains_with_its_compiled_llm(tiny_overrides, tiny_llama):
    """The shipped config_quick_llm.yaml (llm.compile on, a loader worker) with a tiny Llama in place of SmolLM2."""
    cfg = load_config(ROOT / "config_quick_llm.yaml", tiny_overrides + ["train.use_llm=true", "train.num_workers=1",
                                                                        f"llm.name={tiny_llama}", "llm.num_queries=8",
                                                                        "train.num_epochs=2"])
    assert cfg.llm.compile and cfg.train.use_llm and cfg.train.num_workers > 0
    t = training.Trainer(cfg)
    t.fit()
    losses = [row["train_llm"] for row in t.runlog.rows]
    assert len(losses) == 2 and all(0 < loss < 20 for loss in losses), losses


def test_llm_off_never_imports_the_llm_code(tiny_overrides, monkeypatch):
    for name in ("transformers", "peft"):
        monkeypatch.setitem(sys.modules, name, None)                # any import of them would now fail
    make(tiny_overrides + ["train.num_epochs=1"]).fit()


def test_missing_llm_directory_is_one_clear_error(tiny_overrides, tmp_path):
    with pytest.raises(UserError, match=f"{tmp_path / 'no-such-llm'}"):
        make(tiny_overrides + ["train.use_llm=true", f"llm.name={tmp_path / 'no-such-llm'}"])


def test_resume_without_llm_state_is_clear(tiny_overrides, tiny_llama):
    last = make(tiny_overrides + ["train.num_epochs=1"]).fit()
    with pytest.raises(UserError, match="trained without the LLM path"):
        make(tiny_overrides + ["train.use_llm=true", f"llm.name={tiny_llama}", "llm.num_queries=8",
                               f"resume={last}"], resume=last)


def test_probe_reports_losses_and_gradients_at_the_tapped_features(tiny_overrides, tiny_llama, capsys):
    import json

    import probe_llm
    llm = ["train.use_llm=true", f"llm.name={tiny_llama}", "llm.num_queries=8"]
    last = make(tiny_overrides + llm + ["train.num_epochs=2"]).fit()
    probe_llm.main([str(ROOT / "config.yaml"), *tiny_overrides, *llm, f"resume={last}", "--batches", "2"])
    report = json.loads(capsys.readouterr().out)
    assert report["batches"] == 2 and report["step"] == 4
    for key in ("l_ctc", "l_llm", "l_llm_shuffled_prefix", "l_text_only", "grad_norm_ctc", "grad_norm_llm"):
        assert report[key] > 0 and report[key] == report[key], key             # positive, not NaN
    assert -1 <= report["grad_cosine"] <= 1
    off = make(tiny_overrides + ["train.num_epochs=1", "model.run_name=off"]).fit()
    with pytest.raises(UserError, match="trained without the LLM path"):
        probe_llm.main([str(ROOT / "config.yaml"), *tiny_overrides, *llm, f"resume={off}"])
    with pytest.raises(UserError, match="another architecture: arch.rnn_hidden_size"):       # not a torch traceback
        probe_llm.main([str(ROOT / "config.yaml"), *tiny_overrides, *llm, f"resume={last}", "arch.rnn_hidden_size=24"])


def llm_keys(tiny_llama, *extra):
    return ["train.use_llm=true", f"llm.name={tiny_llama}", "llm.num_queries=8", "llm.qformer_layers=1", *extra]


def test_align_stage_trains_the_connector_alone_and_the_joint_stage_starts_from_it(tiny_overrides, tiny_llama):
    base = make(tiny_overrides + ["train.num_epochs=1", "model.run_name=base"]).fit()
    recognizer = load_checkpoint(base)["model"]
    t = make(tiny_overrides + llm_keys(tiny_llama, "train.stage=align", f"train.init_from={base}",
                                       "align.num_epochs=2", "align.warmup_steps=0", "train.llm_val_lines=3",
                                       "model.run_name=align"))
    assert t.cfg.train.llm_sample_ratio == 1.0 and t.cfg.train.num_epochs == 2         # align.* in effect
    assert [g["lr"] for g in t.optimizer.param_groups] == [t.cfg.align.lr]             # the connector alone
    t.fit()
    for k, v in t.model.state_dict().items():                                          # the recognizer is frozen
        assert torch.equal(v, recognizer[k]), k
    steps, rows = t.runlog.steps, t.runlog.rows
    assert all("llm" in r and "ctc" not in r for r in steps) and len(steps) == 4
    assert all(r["llm"] > 0 for r in steps)
    for key in ("val_llm", "val_llm_text_only", "val_llm_shuffled", "val_prefix_rms", "val_reading_cer"):
        assert all(key in r and r[key] == r[key] for r in rows), key                   # logged, not NaN
    assert (t.run_dir / "learning_curve.png").is_file()                                # with the val L_LLM curves
    best = load_checkpoint(t.run_dir / "best.pt")
    assert best["best_cer"] == min(r["val_llm"] for r in rows)                         # best.pt: lowest val L_LLM
    joint = make(tiny_overrides + llm_keys(tiny_llama, f"train.init_from={t.run_dir / 'best.pt'}",
                                           "model.run_name=joint"))
    for k, v in joint.llm.connector.state_dict().items():
        assert torch.equal(v, best["llm"]["trainable"][f"connector.{k}"]), k


def test_stage_tap_and_connector_mistakes_are_one_clear_error_each(tiny_overrides, tiny_llama, tmp_path):
    with pytest.raises(UserError, match="train.stage=align trains the connector on a trained recognizer"):
        make(tiny_overrides + llm_keys(tiny_llama, "train.stage=align"))
    with pytest.raises(UserError, match="train.stage must be joint or align, got 'aling'"):
        make(tiny_overrides + ["train.stage=aling"])
    with pytest.raises(UserError, match="train.llm_tap='rnn2' does not exist .*use one of backbone, rnn1, rnn_last"):
        make(tiny_overrides + llm_keys(tiny_llama, "train.llm_tap=rnn2"))
    with pytest.raises(UserError, match="train.llm_tap='rnn1' does not exist for arch.head_type=cnn"):
        make(tiny_overrides + llm_keys(tiny_llama, "arch.head_type=cnn"))
    llm_run = make(tiny_overrides + llm_keys(tiny_llama, "train.num_epochs=1", "model.run_name=llm")).fit()
    with pytest.raises(UserError, match="init_from=.*another LM or tap width.*train.llm_tap"):
        make(tiny_overrides + llm_keys(tiny_llama, f"train.init_from={llm_run}", "train.llm_tap=backbone"))
    with pytest.raises(UserError, match=r"checkpoint mismatch.*its run had llm.connector=qformer$"):  # what to set
        make(tiny_overrides + llm_keys(tiny_llama, f"train.init_from={llm_run}", "llm.connector=frame_stack"))


@pytest.mark.parametrize("tap", ["rnn1", "backbone", "rnn_last"])
def test_joint_stage_balances_and_logs_both_gradients_at_the_tap(tiny_overrides, tiny_llama, tap):
    t = make(tiny_overrides + llm_keys(tiny_llama, f"train.llm_tap={tap}", "train.num_epochs=1", "train.llm_alpha=1000",
                                       "train.llm_grad_ratio=0.3", "train.llm_sample_ratio=0.5"))
    t.fit()
    for row in t.runlog.steps:
        assert row["grad_ctc"] > 0 and row["grad_llm"] > 0 and -1 <= row["grad_cosine"] <= 1
        assert row["grad_llm"] * row["grad_llm_scale"] == pytest.approx(0.3 * row["grad_ctc"], rel=1e-4)
        assert row["ctc_per_char"] == pytest.approx(row["ctc"] * 4 / sum(map(len, WORDS[:4])), rel=0.6)


def test_each_loss_group_is_clipped_on_its_own(tiny_overrides, tiny_llama):
    """A huge α·L_LLM fills the connector's gradient; the recognizer's clipped gradient must not shrink for it,
    as one global norm over both would make it."""
    t = make(tiny_overrides + llm_keys(tiny_llama, "train.llm_alpha=1e6", "train.grad_clip=5",
                                       "train.llm_grad_clip=0.01", "train.llm_grad_ratio=0.3"))
    t.loss(next(iter(t.loader)))["total"].backward()
    (recognizer, _, clip), (connector, _, llm_clip) = t.clip_groups
    own = torch.nn.utils.get_total_norm([p.grad for p in recognizer])
    for params, _, max_norm in t.clip_groups:
        t.acc.clip_grad_norm_(params, max_norm)
    assert torch.nn.utils.get_total_norm([p.grad for p in connector]) == pytest.approx(llm_clip, rel=1e-3)
    assert torch.nn.utils.get_total_norm([p.grad for p in recognizer]) == pytest.approx(min(own, clip), rel=1e-3)

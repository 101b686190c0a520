"""The LLM path inside the trainer: L = L_CTC + alpha * L_LLM, checkpoints, resume, and the LLM-off path."""
import sys

import pytest
import torch

import trainer
from conftest import ROOT
from prepare_llm import write_tiny
from utils import UserError, load_checkpoint, load_config


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("llm") / "tiny-llama"
    write_tiny("tiny-llama", path)
    return path


def make(overrides, resume=None):
    cfg = load_config(ROOT / "config.yaml", overrides)
    return trainer.Trainer(cfg, (load_checkpoint(resume), resume) if resume else None)


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
    t = trainer.Trainer(cfg)
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

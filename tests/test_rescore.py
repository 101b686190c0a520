"""LLM n-best rescoring: exact log-likelihoods from a tiny random Llama, rescoring, beta tuning, loading errors."""
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from htr.llm_assist import LLMLoadError
from htr.llm_weights import write_tiny
from htr.rescore import LLMRescorer, llm_rescore, rescore_nbest, tune_beta
from utils import UserError

TEXTS = ["the quick brown fox", "is to be made at a meeting of Labour M Ps tomorrow."]


@pytest.fixture(scope="module")
def rescorer(tmp_path_factory):
    path = tmp_path_factory.mktemp("llms") / "tiny-llama"
    write_tiny("tiny-llama", path)
    return LLMRescorer(str(path), "cpu", batch_size=4)


def manual_logp(lm, text: str) -> float:
    """One unpadded sequence BOS + text + EOS: sum of log_softmax(logits)[t, token t+1]."""
    seq = torch.tensor([[lm.bos_id, *lm.encode([text])[0], lm.eos_id]])  # (1, L)
    with torch.no_grad():
        logp = lm.model(input_ids=seq).logits[0].log_softmax(-1)  # (L, V)
    return logp[:-1].gather(1, seq[0, 1:, None]).sum().item()


def test_score_matches_manual_logits(rescorer):
    expected = [manual_logp(rescorer.lm, t) for t in TEXTS]
    assert np.allclose(rescorer.score(TEXTS), expected, atol=1e-4)


def test_padding_does_not_change_scores(rescorer):
    texts = TEXTS + ["a", "", "MOVE to stop Mr. Gaitskell"]
    batched = rescorer.score(texts)
    rescorer.cache.clear()
    single = np.concatenate([rescorer.score([t]) for t in texts])
    assert np.allclose(batched, single, atol=1e-4)
    assert batched[3] < 0  # empty text: log P(EOS | BOS)


def test_cache(rescorer, monkeypatch):
    rescorer.cache.clear()
    first = rescorer.score(TEXTS)
    assert set(rescorer.cache) == set(TEXTS)
    monkeypatch.setattr(rescorer, "_score_ids", lambda ids: pytest.fail("cached texts were scored again"))
    assert np.array_equal(rescorer.score(TEXTS[::-1] + TEXTS), np.concatenate([first[::-1], first]))


NBEST = [[("thc quiek fox", -10.0), ("the quick fox", -10.5)],
         [("on the mat", -3.0), ("an the mat", -4.0)],
         []]


def fake_llm(texts):
    return np.array([0.0 if t in ("the quick fox", "on the mat") else -20.0 for t in texts])


def test_rescore_nbest_beta_zero_keeps_1best():
    assert rescore_nbest(NBEST, fake_llm, 0.0) == ["thc quiek fox", "on the mat", ""]


def test_rescore_nbest_llm_flips_choice():
    assert rescore_nbest(NBEST, fake_llm, 1.0) == ["the quick fox", "on the mat", ""]


def test_tune_beta_minimises_cer():
    # beta 0 keeps the acoustic error; beta >= 0.1 fixes line 0; beta 1 also breaks line 1 (LLM prefers "an")
    nbest = [[("thc quiek fox", -10.0), ("the quick fox", -11.0)],
             [("on the mat", -3.0), ("an the mat", -6.0)]]

    def llm(texts):
        return np.array([{"the quick fox": 0.0, "thc quiek fox": -20.0, "on the mat": -5.0}.get(t, 0.0)
                         for t in texts])
    beta, table = tune_beta(nbest, ["the quick fox", "on the mat"], llm, betas=(0.0, 0.1, 0.3, 1.0))
    assert beta == 0.1
    assert [r["beta"] for r in table] == [0.0, 0.1, 0.3, 1.0]
    assert table[1]["cer"] == 0.0 and table[0]["cer"] > 0 and table[3]["cer"] > 0


@pytest.mark.parametrize("dtype, expected", [("bf16", "bfloat16"), ("fp32", "float32")])
def test_llm_rescore_end_to_end(rescorer, dtype, expected):
    cfg = OmegaConf.create({"llm": {"name": rescorer.lm.name, "dtype": dtype}})
    hyps, info = llm_rescore(cfg, NBEST, NBEST[:2], ["the quick fox", "on the mat"], "cpu", betas=(0.0, 1.0))
    assert len(hyps) == 3 and hyps[2] == ""
    assert info["llm"] == rescorer.lm.name and info["beta"] in (0.0, 1.0) and len(info["val_table"]) == 2
    assert info["dtype"] == expected                                    # llm.dtype holds for rescoring too
    with pytest.raises(UserError, match="llm.dtype must be auto, bf16 or fp32"):
        llm_rescore(OmegaConf.create({"llm": {"name": rescorer.lm.name, "dtype": "fp8"}}), [], [], [], "cpu")


def test_missing_model_dir(tmp_path):
    missing = str(tmp_path / "no-such-llm")
    with pytest.raises(LLMLoadError, match="no-such-llm"):
        LLMRescorer(missing, "cpu")
    with pytest.raises(UserError, match="no-such-llm") as err:
        llm_rescore(OmegaConf.create({"llm": {"name": missing}}), [], [], [], "cpu")
    assert "\n" not in str(err.value)

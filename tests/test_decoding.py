import itertools
import json

import numpy as np
import pytest

from htr.decoding import (BOS, EOS, CharNgramLM, beam_search, char_confidences, decode_batch, greedy_decode,
                      line_confidence, tune_lm_weights)

CHARSET = " abcdefghijklmnopqrstuvwxyz.,'"
TEXT = ["the cat sat on the mat", "hello there", "hello world", "say hello to the cat", "the hat is on the cat",
        "a cat and a hat", "well hello, how are you", "the world is round"]


def frames(path: str, p: float = 0.9, ambiguous: dict = None) -> np.ndarray:
    """(T, C) log-probs with one frame per symbol of `path` ('_' = blank) holding probability p;
    ambiguous = {frame: {char: prob}} overrides a frame."""
    C = len(CHARSET) + 1
    probs = np.full((len(path), C), (1 - p) / (C - 1))
    for t, ch in enumerate(path):
        probs[t, 0 if ch == "_" else CHARSET.index(ch) + 1] = p
    for t, dist in (ambiguous or {}).items():
        probs[t] = (1 - sum(dist.values())) / (C - len(dist))
        for ch, q in dist.items():
            probs[t, CHARSET.index(ch) + 1] = q
    return np.log(probs).astype(np.float32)


def peaky(seed: int, T: int = 64) -> np.ndarray:
    """Random posteriors as a trained CTC model gives them: one dominant class per frame."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(T, len(CHARSET) + 1))
    logits[np.arange(T), rng.integers(0, len(CHARSET) + 1, T)] += 7
    return (logits - np.log(np.exp(logits).sum(1, keepdims=True))).astype(np.float32)


@pytest.fixture(scope="module")
def lm():
    model = CharNgramLM(CHARSET, order=4)
    model.fit(TEXT)
    return model


# ------------------------------------------------------------------------------------------------ beam search

def test_beam1_without_lm_is_greedy(lm):
    # (on flat posteriors a width-1 prefix search may differ from the best path: it sums paths per prefix)
    for seed in range(60):
        lp = peaky(seed)
        assert beam_search(lp, CHARSET, None, beam=1)[0][0] == greedy_decode(lp, CHARSET)
        assert beam_search(lp, CHARSET, lm, beam=1, lm_weight=0.0)[0][0] == greedy_decode(lp, CHARSET)


def test_prefix_probability_beats_best_path():
    lp = np.log(np.array([[0.6, 0.4], [0.6, 0.4]]))            # best path "" (0.36); P("a") = 0.64
    assert greedy_decode(lp, "a") == ""
    nbest = beam_search(lp, "a", beam=4, blank_skip=1.0)
    assert [t for t, _ in nbest] == ["a", ""]
    assert np.allclose([s for _, s in nbest], np.log([0.64, 0.36]))


def test_wide_beam_is_exact():
    """Without pruning, the n-best scores are the exact CTC label probabilities (all paths enumerated)."""
    rng = np.random.default_rng(0)
    for _ in range(10):
        lp = np.log(rng.dirichlet(np.ones(3), 6))
        exact = {}
        for path in itertools.product(range(3), repeat=6):
            label = "".join("ab"[c - 1] for i, c in enumerate(path) if c and (i == 0 or c != path[i - 1]))
            exact[label] = np.logaddexp(exact.get(label, -np.inf), lp[np.arange(6), path].sum())
        nbest = beam_search(lp, "ab", beam=1000, prune_topk=3, prune_threshold=0, blank_skip=1.0,
                            beam_threshold=np.inf)
        assert len(nbest) == len(exact)
        assert all(np.isclose(s, exact[t]) for t, s in nbest)
        assert nbest[0][1] == max(s for _, s in nbest)


def test_lm_flips_ambiguous_char(lm):
    lp = frames("h_e_l_l_o", ambiguous={2: {"c": 0.55, "e": 0.44}})
    assert greedy_decode(lp, CHARSET) == "hcllo"
    assert beam_search(lp, CHARSET, None)[0][0] == "hcllo"
    assert beam_search(lp, CHARSET, lm, lm_weight=0.5)[0][0] == "hello"


def test_blank_skip_and_pruning_keep_the_answer(lm):
    lp = frames("___h__e_l_l__o___", p=0.9999, ambiguous={6: {"c": 0.55, "e": 0.44}})
    exact = beam_search(lp, CHARSET, lm, prune_topk=len(CHARSET), prune_threshold=0, blank_skip=1.0)
    fast = beam_search(lp, CHARSET, lm)
    assert fast[0][0] == exact[0][0] == "hello"
    assert np.isclose(fast[0][1], exact[0][1], atol=1e-2)


def test_decode_batch_pool_equals_serial(lm):
    batch = [peaky(seed, T=40) for seed in range(12)] + [frames("h_e_l_l_o", ambiguous={2: {"c": 0.55, "e": 0.44}})]
    cfg = {"beam": 8, "lm_weight": 0.7, "lm_bonus": 0.3, "lm_text": "ignored"}
    serial = decode_batch(batch, CHARSET, lm, cfg, workers=1)
    assert decode_batch(batch, CHARSET, lm, cfg, workers=2) == serial
    assert serial[-1][0][0] == "hello"


def test_tune_lm_weights_prefers_the_lm(lm):
    val = [frames("h_e_l_l_o", ambiguous={2: {"c": 0.55, "e": 0.44}}), frames("c_a_t")]
    weight, bonus, table = tune_lm_weights(val, ["hello", "cat"], CHARSET, lm, [0.0, 0.5], [0.0])
    assert (weight, bonus) == (0.5, 0.0)
    assert [row["cer"] for row in table] == [pytest.approx(1 / 8), 0.0]


# ------------------------------------------------------------------------------------------------ confidences

def test_confidences_follow_the_best_path():
    lp = frames("h_e_l_l_o", ambiguous={2: {"c": 0.55, "e": 0.44}})
    confs = char_confidences(lp, CHARSET)
    assert "".join(ch for ch, _ in confs) == greedy_decode(lp, CHARSET)
    assert np.allclose([c for _, c in confs], [0.9, 0.55, 0.9, 0.9, 0.9])
    assert line_confidence(lp) == pytest.approx(np.mean([0.9, 0.55, 0.9, 0.9, 0.9]))
    assert line_confidence(frames("___", p=0.8)) == pytest.approx(0.8)


# ------------------------------------------------------------------------------------------------ n-gram LM

def test_lm_distributions_sum_to_one(lm):
    for context in ["", "h", "hel", "the ca", "zzqx", "xq'.,", "say hello to the cat"]:
        probs = np.exp(lm.next_logprobs(lm.state(context)))
        assert probs.shape == (len(CHARSET) + 1,) and np.all(probs > 0)
        assert probs.sum() == pytest.approx(1.0, abs=1e-9)
        total = sum(np.exp(lm.log_prob(context, ch)) for ch in list(CHARSET) + [CharNgramLM.END])
        assert total == pytest.approx(1.0, abs=1e-9)


def test_lm_learns_the_text(lm):
    assert lm.log_prob("hel", "l") > lm.log_prob("hel", "c")
    assert lm.log_prob("the ca", "t") > np.log(0.5)
    assert lm.log_prob("hello world", CharNgramLM.END) > lm.log_prob("hello wor", CharNgramLM.END)


def test_out_of_charset_chars_split_the_line():
    """An out-of-charset character is context that is never predicted: the counts equal those of an LM whose
    charset has it, minus the n-grams with it; no n-gram spans it, and it is no line end or start."""
    lines = ["ab£cd", "hello£world£", "£plain£££text"]
    model = CharNgramLM(CHARSET, order=3)
    assert model.fit(lines) == 7
    wider = CharNgramLM(CHARSET + "£", order=3)
    wider.fit(lines)
    assert model.counts == [{g: c for g, c in table.items() if "£" not in g} for table in wider.counts]
    assert not any(gram in table for table in model.counts for gram in ["bc", "ow", "ab" + EOS, BOS + "c"])
    assert model.fit(["a!b", "a£b"]) == 2 and "ab" not in model.counts[1]


def test_out_of_charset_char_cuts_the_query_context():
    model = CharNgramLM(CHARSET, order=4)
    model.fit(["ab£cd", "xbc"])
    assert model.log_prob("ab", "c") == model.log_prob("b", "c") < model.log_prob("x", "b")   # "bc": once
    assert model.log_prob("zzab£c", "d") == pytest.approx(float(model.next_logprobs("c")[model.index["d"]]))
    assert model.log_prob("ab£c", "d") != model.log_prob("abc", "d")


def test_save_load_round_trip(lm, tmp_path):
    for name in ["lm.json", "lm.json.gz"]:
        lm.save(tmp_path / name)
        loaded = CharNgramLM.load(tmp_path / name, CHARSET)
        assert loaded.order == lm.order and loaded.charset == lm.charset
        for context in ["", "hel", "the ca", "zzqx", "say hello to the cat"]:
            state = lm.state(context)
            np.testing.assert_array_equal(loaded.next_logprobs(state), lm.next_logprobs(state))


@pytest.mark.parametrize("corrupt", [
    lambda d: "garbage, not json",
    lambda d: json.dumps({**d, "format": "something-else"}),
    lambda d: json.dumps({**d, "counts": d["counts"][:-1]}),
    lambda d: json.dumps({**d, "counts": [d["counts"][0] | {"é": 3}] + d["counts"][1:]}),
    lambda d: json.dumps({**d, "counts": [d["counts"][0] | {"a": -1}] + d["counts"][1:]}),
    lambda d: json.dumps({**d, "discounts": [[0.5, 1.0]] * len(d["discounts"])}),
])
def test_bad_lm_file_raises_value_error(lm, tmp_path, corrupt):
    good = tmp_path / "good.json"
    lm.save(good)
    bad = tmp_path / "bad.json"
    bad.write_text(corrupt(json.loads(good.read_text(encoding="utf-8"))), encoding="utf-8")
    with pytest.raises(ValueError, match="bad.json"):
        CharNgramLM.load(bad)


def test_lm_for_another_charset_raises(lm, tmp_path):
    lm.save(tmp_path / "lm.json")
    with pytest.raises(ValueError, match=r"lm\.json.*charset"):
        CharNgramLM.load(tmp_path / "lm.json", CHARSET + "!")
    with pytest.raises(ValueError, match="missing.json"):
        CharNgramLM.load(tmp_path / "missing.json")

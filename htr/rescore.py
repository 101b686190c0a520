"""
N-best rescoring with a frozen causal LLM (decode.llm_rescore=true).

Each candidate line of a beam-search n-best list gets a text-only log-likelihood from the LLM named by `llm.name`
(the same model LLM-assisted training uses, no visual prefix):

    log P(text) = sum over t of log P(token_t | BOS, token_1 .. token_t-1), the last token being EOS

and the line's new score is  beam score + beta * log P(text).  beta is tuned on the val n-best lists (corpus CER)
and applied to test. Models without a BOS token (Qwen2) condition on EOS instead, GPT-2 style.
"""
import logging

import numpy as np
import torch
import torch.nn.functional as F

from htr.llm_assist import IGNORE, FrozenCausalLM, LLMLoadError, build_lm_batch, llm_dtype
from htr.metrics import corpus_cer
from utils import UserError

log = logging.getLogger("htr")
BETAS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0)


class LLMRescorer:
    """Total log-likelihood of text lines under a frozen causal LM, cached per text."""

    def __init__(self, name: str, device, gguf_file: str | None = None, batch_size: int = 32,
                 dtype: torch.dtype | None = None):
        self.lm = FrozenCausalLM(name, torch.device(device), gguf_file=gguf_file, dtype=dtype)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.cache: dict[str, float] = {}

    def score(self, texts: list[str]) -> np.ndarray:
        """(N,) float64 log P(text + EOS | BOS) per text; texts already scored come from the cache."""
        todo = sorted(set(texts) - self.cache.keys())
        ids = self.lm.encode(todo)
        order = sorted(range(len(todo)), key=lambda i: len(ids[i]))  # similar lengths share a batch: less padding
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            for i, s in zip(chunk, self._score_ids([ids[i] for i in chunk])):
                self.cache[todo[i]] = s
        return np.array([self.cache[t] for t in texts], dtype=np.float64)

    @torch.inference_mode()
    def _score_ids(self, text_ids: list[list[int]]) -> list[float]:
        lm = self.lm
        start_id = lm.eos_id if lm.bos_id is None else lm.bos_id
        batch = build_lm_batch(text_ids, 0, [start_id], lm.eos_id, lm.pad_id).to(self.device)  # (B, L), right-padded
        logits = lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
        targets = batch.labels[:, 1:]  # (B, L-1): position t predicts token t+1
        logp = F.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, L-1, V)
        token_logp = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, L-1)
        return (token_logp * (targets != IGNORE)).sum(dim=1).tolist()


# ------------------------------------------------------------------------------------------------ n-best lists


def candidate_scores(nbest_lists, llm_scores_fn) -> dict:
    """{text: LLM log-prob} for every distinct candidate, from one call of llm_scores_fn(list[str]) -> (N,)."""
    texts = sorted({text for nbest in nbest_lists for text, _ in nbest})
    return dict(zip(texts, np.asarray(llm_scores_fn(texts), dtype=np.float64).tolist())) if texts else {}


def pick_best(nbest_lists, llm_logp: dict, beta: float) -> list[str]:
    """Per line, the candidate maximising beam score + beta * LLM log-prob ("" for an empty list)."""
    return [max(nbest, key=lambda c: c[1] + beta * llm_logp[c[0]])[0] if nbest else "" for nbest in nbest_lists]


def rescore_nbest(nbest_lists, llm_scores_fn, beta: float) -> list[str]:
    """nbest_lists: per line [(text, score)] as decoding.decode_batch returns them; the best text per line."""
    return pick_best(nbest_lists, candidate_scores(nbest_lists, llm_scores_fn), beta)


def tune_beta(nbest_val, refs_val, llm_scores_fn, betas=BETAS) -> tuple:
    """Grid search of beta minimising corpus CER on val (first in grid order on ties).
    Returns (best_beta, table) with table = [{"beta", "cer"}] in grid order."""
    llm_logp = candidate_scores(nbest_val, llm_scores_fn)  # the only LLM calls: the grid itself is cheap
    table = [{"beta": b, "cer": corpus_cer(refs_val, pick_best(nbest_val, llm_logp, b))} for b in betas]
    best = min(table, key=lambda r: r["cer"])
    return best["beta"], table


def llm_rescore(cfg, nbest_test, nbest_val, refs_val, device, betas=BETAS) -> tuple:
    """Tune beta on the val n-best lists with the LLM `cfg.llm.name` (in `llm.dtype`), then rescore test.
    Returns (test hypotheses, {"beta", "val_table", "llm", "dtype"})."""
    name = cfg.llm.name
    try:
        dtype = llm_dtype(cfg.llm.get("dtype", "auto"), torch.device(device))
        rescorer = LLMRescorer(name, device, gguf_file=cfg.llm.get("gguf_file"), dtype=dtype)
    except LLMLoadError as e:
        raise UserError(f"decode.llm_rescore=true: {str(e).splitlines()[0]} (or set decode.llm_rescore=false)") \
            from e
    beta, table = tune_beta(nbest_val, refs_val, rescorer.score, betas)
    for row in table:
        log.info("LLM rescoring on val: beta %.3g -> CER %.4f", row["beta"], row["cer"])
    log.info("best on val: beta=%s (%s, %d distinct val candidates)", beta, name, len(rescorer.cache))
    return rescore_nbest(nbest_test, rescorer.score, beta), {"beta": beta, "val_table": table, "llm": name,
                                                             "dtype": str(rescorer.lm.dtype).removeprefix("torch.")}

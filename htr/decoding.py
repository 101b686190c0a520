"""
CTC decoding: greedy best path, prefix beam search with a character n-gram LM (shallow fusion),
CTC confidences and LM-weight tuning.

Conventions: a line's recognizer output is `log_probs` (T, C) float32 log-softmax; class 0 is the CTC
blank and class i >= 1 is charset[i-1]. `charset` is a str / list of single characters, or any object
with a `.chars` string (utils.Charset).
"""

import gzip
import inspect
import json
import logging
import math
import multiprocessing as mp
from collections import Counter, defaultdict

import numpy as np

from htr.metrics import corpus_cer

log = logging.getLogger(__name__)

BOS = "\u2402"              # start-of-line pad inside n-grams ("␂"); never predicted
EOS = "\u2403"              # end of line ("␃"); the last LM vocabulary entry
OOC = "\u2400"              # an out-of-charset character while counting ("␀"); never predicted or stored
NEG_INF = float("-inf")
LM_FORMAT = "htr-char-ngram-lm"
MIN_DISCOUNT = 0.1          # keeps every character reachable (no zero probabilities)


def _chars(charset) -> str:
    return "".join(getattr(charset, "chars", charset))


# ----------------------------------------------------------------------------------------------- n-gram LM

class CharNgramLM:
    """
    Character n-gram LM with interpolated modified Kneser-Ney smoothing (Chen & Goodman).

    Vocabulary (V = len(charset) + 1): charset[i] has index i and the end of line is index V-1, so the LM
    index of CTC class c >= 1 is c - 1. Lines are padded with order-1 BOS marks; an LM *state* is the
    last order-1 characters of the BOS-padded text decoded so far (see `state`).
    The model is its adjusted counts (raw counts for the top order and for n-grams starting with BOS,
    continuation counts otherwise) and three discounts per order; up to `cache_size` computed distributions
    are memoised (the beam search asks for the same contexts again and again).
    """

    END = "</s>"            # name of the end-of-line symbol for log_prob()

    def __init__(self, charset, order: int = 6, cache_size: int = 500_000):
        self.charset = _chars(charset)
        if order < 1:
            raise ValueError(f"LM order must be >= 1, got {order}")
        if len(set(self.charset)) != len(self.charset) or {BOS, EOS, OOC} & set(self.charset):
            raise ValueError("LM charset must hold distinct characters other than the BOS/EOS/OOC marks")
        self.order = order
        self.vocab = self.charset + EOS
        self.index = {ch: i for i, ch in enumerate(self.vocab)}
        self.counts = [{} for _ in range(order)]          # counts[k]: (k+1)-gram -> adjusted count
        self.discounts = [(0.5, 1.0, 1.5)] * order         # per order: D1, D2, D3+
        self.cache_size = cache_size
        self._tables = [{} for _ in range(order)]          # per context length: context -> (idx, disc, gamma)
        self._cache, self._log_cache = {}, {}             # context -> probabilities / state -> log-probs

    # ---- estimation

    def fit(self, lines, text_file=None) -> int:
        """Estimate from an iterable of text lines (+ the lines of a UTF-8 text file). Returns the number of
        out-of-charset characters, which are never predicted and split their line (see `_pieces`)."""
        lines = list(lines)
        if text_file is not None:
            with open(text_file, encoding="utf-8") as f:
                lines += f.read().splitlines()
        pieces = [self._pieces(line) for line in lines]
        unknown = sum(len(p) - 1 for p in pieces)
        if unknown:
            log.warning("LM: %d out-of-charset characters split %d lines (no n-gram spans them)", unknown,
                        sum(len(p) > 1 for p in pieces))
        if unknown == sum(map(len, lines)):
            raise ValueError("LM: no in-charset training text")
        self.counts = self._adjusted_counts(self._raw_counts(pieces))
        self.discounts = [self._kn_discounts(c) for c in self.counts]
        self._build_tables()
        return unknown

    def _pieces(self, line: str) -> list:
        """
        A line cut at its out-of-charset characters, padded for counting: the first piece starts with the
        order-1 BOS marks, each later one with the mark OOC standing for the character that cut it, and the
        last piece ends with EOS. So "ab£cd" -> [BOS..."ab", OOC + "cd" + EOS]: no n-gram spans the cut, and
        the cut is neither a line end (no EOS after "ab") nor a line start (no BOS before "cd"), since the
        line neither ended nor started there; padding each piece like a line would invent both. The OOC
        mark only records a left extension of "cd" (Kneser-Ney continuation counts); it is never stored.
        """
        text = "".join(ch if ch in self.index and ch != EOS else OOC for ch in line)
        first, *rest = text.split(OOC)
        pieces = [BOS * (self.order - 1) + first] + [OOC + piece for piece in rest]
        pieces[-1] += EOS
        return pieces

    def _raw_counts(self, lines) -> list:
        """raw[k]: Counter of the (k+1)-grams ending at each character / EOS of the lines' `_pieces` (after
        each piece's padding); a gram may start with the piece's padding, never reach beyond it."""
        n = self.order
        raw = [Counter() for _ in range(n)]
        for pieces in lines:
            for j, p in enumerate(pieces):
                lead = n - 1 if j == 0 else 1
                for k in range(n):
                    raw[k].update(p[i - k:i + 1] for i in range(max(lead, k), len(p)))
        return raw

    def _adjusted_counts(self, raw) -> list:
        """KN counts: for lower orders, the number of distinct left extensions (raw counts after BOS).
        Grams starting with OOC only count as left extensions."""
        adjusted = [{g: c for g, c in raw[-1].items() if g[0] != OOC}]
        for k in range(self.order - 2, -1, -1):
            left_ext = Counter(g[1:] for g in raw[k + 1])
            adjusted.insert(0, {g: (c if g[0] == BOS else left_ext[g]) for g, c in raw[k].items() if g[0] != OOC})
        return adjusted

    @staticmethod
    def _kn_discounts(counts) -> tuple:
        """Modified KN discounts D1, D2, D3+ from the count-of-counts n1..n4 (defaults if degenerate)."""
        coc = Counter(counts.values())
        n1, n2, n3, n4 = (coc[i] for i in range(1, 5))
        if min(n1, n2, n3, n4) == 0:
            return 0.5, 1.0, 1.5
        y = n1 / (n1 + 2 * n2)
        d = (1 - 2 * y * n2 / n1, 2 - 3 * y * n3 / n2, 3 - 4 * y * n4 / n3)
        return tuple(float(np.clip(di, MIN_DISCOUNT, i + 1)) for i, di in enumerate(d))

    def _build_tables(self):
        """Per context: vocabulary indices, discounted probabilities (c - D) / A and backoff mass gamma."""
        self._cache, self._log_cache = {}, {}
        for k, counts in enumerate(self.counts):
            groups = defaultdict(list)
            for gram, c in counts.items():
                groups[gram[:-1]].append((self.index[gram[-1]], c))
            d = np.array((0.0,) + tuple(self.discounts[k]))
            table = self._tables[k] = {}
            for ctx, items in groups.items():
                idx, c = np.array(items).T
                disc, total = d[np.minimum(c, 3)], c.sum()
                table[ctx] = (idx, (c - disc) / total, disc.sum() / total)

    # ---- queries

    def state(self, text: str) -> str:
        """LM state after `text` (charset characters only): its last order-1 characters, BOS-padded."""
        s = BOS * (self.order - 1) + text
        return s[len(s) - self.order + 1:]

    def _remember(self, cache: dict, key: str, value: np.ndarray) -> np.ndarray:
        if len(cache) >= self.cache_size:
            cache.clear()
        value.flags.writeable = False
        cache[key] = value
        return value

    def _probs(self, ctx: str) -> np.ndarray:
        """P(. | ctx) over the vocabulary (V,) for a context seen in training (or ""), recursively
        interpolated with the shorter context."""
        p = self._cache.get(ctx)
        if p is None:
            idx, disc, gamma = self._tables[len(ctx)][ctx]
            p = gamma * (self._probs(ctx[1:]) if ctx else np.full(len(self.vocab), 1.0 / len(self.vocab)))
            p[idx] += disc
            self._remember(self._cache, ctx, p)
        return p

    def next_logprobs(self, state: str) -> np.ndarray:
        """log P(. | state) over the vocabulary (V,) float64, read-only; the last entry is the end of line.
        An unseen context backs off entirely, so this is the distribution of its longest seen suffix."""
        logp = self._log_cache.get(state)
        if logp is None:
            ctx = state[max(0, len(state) - self.order + 1):]
            while ctx and ctx not in self._tables[len(ctx)]:
                ctx = ctx[1:]
            logp = self._log_cache.get(ctx)
            if logp is None:
                logp = self._remember(self._log_cache, ctx, np.log(self._probs(ctx)))
            self._remember(self._log_cache, state, logp)
        return logp

    def log_prob(self, context: str, char: str) -> float:
        """log P(char | context), context = the line so far; char is a charset character or END. As in
        training, an out-of-charset character cuts the context: only the text after it counts, unpadded."""
        char = EOS if char == self.END else char
        if char not in self.index:
            raise ValueError(f"LM: {char!r} is not in the vocabulary")
        piece = self._pieces(context)[-1][:-1].lstrip(OOC)         # after the last cut; BOS-padded if uncut
        return float(self.next_logprobs(piece[max(0, len(piece) - self.order + 1):])[self.index[char]])

    # ---- persistence

    def save(self, path):
        """JSON (gzip if path ends in .gz): order, charset, discounts and the adjusted n-gram counts."""
        data = {"format": LM_FORMAT, "version": 1, "order": self.order, "charset": self.charset,
                "bos": BOS, "eos": EOS, "discounts": [list(d) for d in self.discounts], "counts": self.counts}
        with (gzip.open if str(path).endswith(".gz") else open)(path, "wt", encoding="utf-8") as f:
            json.dump(data, f, ensure_ascii=False, indent=1)

    @classmethod
    def load(cls, path, charset=None) -> "CharNgramLM":
        """Load a saved LM; if `charset` is given it must equal the LM's. Bad files raise ValueError."""
        try:
            with (gzip.open if str(path).endswith(".gz") else open)(path, "rt", encoding="utf-8") as f:
                data = json.load(f)
            lm = cls(*_check_header(data, charset))
            lm.counts, lm.discounts = _check_tables(data, lm)
        except (OSError, UnicodeDecodeError, EOFError, ValueError) as e:   # JSONDecodeError is a ValueError
            raise ValueError(f"{path}: not a usable character LM file: {e}") from None
        lm._build_tables()
        return lm


def _check_header(data, charset) -> tuple:
    """(charset, order) of a loaded LM file, checked against the recognizer's charset if given."""
    if not isinstance(data, dict) or data.get("format") != LM_FORMAT or data.get("version") != 1:
        raise ValueError(f"expected a JSON object with format {LM_FORMAT!r}, version 1")
    if (data.get("bos"), data.get("eos")) != (BOS, EOS):
        raise ValueError("unexpected BOS/EOS marks")
    order, lm_chars = data.get("order"), data.get("charset")
    if not isinstance(order, int) or order < 1 or not isinstance(lm_chars, str):
        raise ValueError("missing or invalid 'order' / 'charset'")
    if charset is not None and _chars(charset) != lm_chars:
        raise ValueError(f"its charset {lm_chars!r} differs from the recognizer's {_chars(charset)!r}")
    return lm_chars, order


def _check_tables(data, lm: CharNgramLM) -> tuple:
    """(counts, discounts) of a loaded LM file: one table and discount triple per order, every n-gram
    over the LM's vocabulary with a positive integer count and its lower-order suffix present."""
    counts, discounts = data.get("counts"), data.get("discounts")
    if not (isinstance(counts, list) and isinstance(discounts, list) and len(counts) == len(discounts) == lm.order):
        raise ValueError(f"expected {lm.order} count tables and discount triples")
    for k, (table, d) in enumerate(zip(counts, discounts)):
        if not (isinstance(d, list) and len(d) == 3 and all(
                isinstance(x, (int, float)) and 0 < x <= i + 1 for i, x in enumerate(d))):
            raise ValueError(f"bad discounts for order {k + 1}: {d!r}")
        if not isinstance(table, dict) or not table:
            raise ValueError(f"empty or invalid count table for order {k + 1}")
        for gram, c in table.items():
            if not (len(gram) == k + 1 and gram[-1] in lm.index and isinstance(c, int) and c > 0
                    and all(ch == BOS or ch in lm.charset for ch in gram[:-1])
                    and (k == 0 or gram[1:] in counts[k - 1])):
                raise ValueError(f"bad {k + 1}-gram entry {gram!r}: {c!r}")
    return counts, [tuple(d) for d in discounts]


# ------------------------------------------------------------------------------------------ greedy and confidence

def _best_path(log_probs: np.ndarray) -> tuple:
    """Runs of the argmax path that emit a character: their classes (N,) and peak posteriors (N,)."""
    best = log_probs.argmax(1)
    starts = np.r_[0, np.flatnonzero(np.diff(best)) + 1]
    emit = best[starts] != 0
    peaks = np.exp(np.maximum.reduceat(log_probs.max(1), starts))
    return best[starts][emit], peaks[emit]


def greedy_decode(log_probs: np.ndarray, charset) -> str:
    """Best path decoding of (T, C) log-probs: argmax per frame, collapse repeats, drop blanks."""
    chars = _chars(charset)
    return "".join(chars[c - 1] for c in _best_path(log_probs)[0])


def char_confidences(log_probs: np.ndarray, charset) -> list:
    """[(char, conf)] along the best path (the chars join to greedy_decode); conf = the character's highest
    posterior over the frames of its run."""
    chars = _chars(charset)
    return [(chars[c - 1], float(p)) for c, p in zip(*_best_path(log_probs))]


def line_confidence(log_probs: np.ndarray) -> float:
    """Mean of char_confidences over the line; for a line decoded as empty, the mean blank posterior."""
    peaks = _best_path(log_probs)[1]
    return float(peaks.mean()) if len(peaks) else float(np.exp(log_probs[:, 0]).mean())


# ------------------------------------------------------------------------------------------ prefix beam search

def _frame_plan(log_probs: np.ndarray, prune_topk: int, prune_threshold: float, blank_skip: float) -> tuple:
    """
    Candidate classes per frame and the steps of the search.
    cols (T, K+1): class 0 (blank) then the top-K non-blank classes, most probable first; col_lp (T, K+1):
    their log-probs. steps: ("skip", log_blank) for a run of frames with blank posterior > blank_skip
    (log-probs summed over the run), ("stay", t) for a frame without a candidate >= prune_threshold,
    ("search", t, n) for a frame whose first n candidates are >= prune_threshold.
    """
    k = max(1, min(prune_topk, log_probs.shape[1] - 1))
    top = np.argpartition(-log_probs[:, 1:], k - 1, axis=1)[:, :k] + 1
    top = np.take_along_axis(top, np.argsort(-np.take_along_axis(log_probs, top, 1), axis=1), 1)
    cols = np.concatenate([np.zeros((len(log_probs), 1), int), top], axis=1)
    col_lp = np.take_along_axis(log_probs, cols, 1)
    n_cands = (col_lp[:, 1:] >= math.log(max(prune_threshold, 1e-300))).sum(1).tolist()
    skip = (log_probs[:, 0] > math.log(blank_skip)).tolist() if blank_skip < 1 else [False] * len(log_probs)
    steps = []
    for t, blank in enumerate(log_probs[:, 0].tolist()):
        if not skip[t]:
            steps.append(("search", t, n_cands[t]) if n_cands[t] else ("stay", t))
        elif steps and steps[-1][0] == "skip":
            steps[-1] = ("skip", steps[-1][1] + blank)
        else:
            steps.append(("skip", blank))
    return cols, col_lp, steps


class _Beams:
    """
    The beam of a CTC prefix search, as arrays over its B prefixes: log P(prefix, path ends in blank) `pb`
    and (ends in the prefix's last char) `pnb`, shallow-fusion score `fused`, CTC class of the last char
    `last` (0 if empty) and the LM's next-symbol log-probs `lm_logp` (B, V) (zeros without an LM).
    """

    def __init__(self, prefixes, pb, pnb, fused, last, lm_logp):
        self.prefixes, self.pb, self.pnb, self.fused, self.last, self.lm_logp = prefixes, pb, pnb, fused, last, lm_logp

    def blank_run(self, log_blank: float) -> None:
        """Frames where only the blank is considered: every path now ends in blank."""
        self.pb = np.logaddexp(self.pb, self.pnb) + log_blank
        self.pnb = np.full_like(self.pnb, NEG_INF)

    def stay(self, row: np.ndarray) -> None:
        """A frame without candidate characters: each prefix continues with blank or its last char."""
        self.pb, self.pnb = np.logaddexp(self.pb, self.pnb) + row[0], self.pnb + row[self.last]

    def step(self, row: np.ndarray, cols: np.ndarray, col_lp: np.ndarray, opts: dict, lm_row, chars: str):
        """One frame: row (C,) log-probs, cols / col_lp (K+1,) candidate classes (blank first) and their
        log-probs. Hypotheses (B, K+1): column 0 keeps each prefix (blank, or its last char repeated), column
        j >= 1 appends class cols[j], adding lm_weight * log P_LM + lm_bonus to its fusion score. Returns the
        best `beam` hypotheses within `beam_threshold` of the best one; lm_row(prefix) gives their lm_logp."""
        total = np.logaddexp(self.pb, self.pnb)
        stay_pb = total + col_lp[0]
        pnb = np.add.outer(total, col_lp)
        pnb[:, 0] = self.pnb + row[self.last]
        self._fix_repeats_and_merge(pnb, cols, col_lp)
        fused = self.fused[:, None] + (opts["lm_weight"] * self.lm_logp.take(cols - 1, axis=1) + opts["lm_bonus"])
        fused[:, 0] = self.fused
        score = pnb + fused
        score[:, 0] = np.logaddexp(stay_pb, pnb[:, 0]) + self.fused
        score = score.ravel()
        top = np.argsort(-score, kind="stable")[:opts["beam"]]
        top = top[score[top] >= max(score[top[0]] - opts["beam_threshold"], -1e300)]   # never -inf ones
        src = top // len(cols)
        cls = cols[top - src * len(cols)]                          # appended class; 0 keeps the prefix
        pb, last, lm_logp, prefixes = stay_pb[src], self.last[src], self.lm_logp[src], []
        for i, (s, c) in enumerate(zip(src.tolist(), cls.tolist())):
            if c:
                prefixes.append(self.prefixes[s] + chars[c - 1])
                pb[i], last[i], lm_logp[i] = NEG_INF, c, lm_row(prefixes[i])
            else:
                prefixes.append(self.prefixes[s])
        return _Beams(prefixes, pb, pnb.ravel()[top], fused.ravel()[top], last, lm_logp)

    def _fix_repeats_and_merge(self, pnb: np.ndarray, cols: np.ndarray, col_lp: np.ndarray) -> None:
        """In place on the (B, K+1) p_nonblank of the hypotheses: appending a prefix's own last char needs a
        blank in between (only its paths ending in blank extend); an extension equal to a prefix already in
        the beam moves its mass to that prefix's stay."""
        column = {c: j for j, c in enumerate(cols.tolist()) if j}
        pb, lp, index, merges = self.pb.tolist(), col_lp.tolist(), None, []
        for i, c in enumerate(self.last.tolist()):
            j = column.get(c)
            if j is not None:
                pnb[i, j] = pb[i] + lp[j]
                index = index or {p: i for i, p in enumerate(self.prefixes)}
                parent = index.get(self.prefixes[i][:-1])
                if parent is not None:
                    merges.append((i, parent, j))
        for i, parent, j in merges:
            pnb[i, 0] = np.logaddexp(pnb[i, 0], pnb[parent, j])
            pnb[parent, j] = NEG_INF

    def nbest(self, lm_weight: float) -> list:
        """[(text, score)] best first; the score includes the weighted end-of-line LM log-prob."""
        score = np.logaddexp(self.pb, self.pnb) + self.fused + lm_weight * self.lm_logp[:, -1]
        order = np.argsort(-score, kind="stable")
        return [(self.prefixes[i], float(score[i])) for i in order.tolist() if score[i] > NEG_INF]


def beam_search(log_probs: np.ndarray, charset, lm: CharNgramLM = None, beam: int = 16, lm_weight: float = 0.5,
                lm_bonus: float = 0.0, prune_topk: int = 8, prune_threshold: float = 1e-3,
                blank_skip: float = 0.999, beam_threshold: float = 10.0) -> list:
    """
    CTC prefix beam search over (T, C) log-probs with optional character-LM shallow fusion.

    Beams are ranked by log P_CTC(prefix) + sum over its characters of (lm_weight * log P_LM + lm_bonus).
    Per frame only the top `prune_topk` characters with posterior >= `prune_threshold` are tried, and
    runs of frames with blank posterior > `blank_skip` just apply the blank to every beam (>= 1 disables).
    Hypotheses scoring more than `beam_threshold` below the frame's best are dropped (inf disables).
    The weighted end-of-line LM log-prob is added at the end.
    Returns the n-best [(text, score)], best first (up to `beam` entries).
    """
    chars = _chars(charset)
    log_probs = np.asarray(log_probs, dtype=np.float64)
    use_lm = lm is not None and lm_weight != 0
    lm_weight, zeros = lm_weight if use_lm else 0.0, np.zeros(len(chars) + 1)
    lm_row = (lambda prefix: lm.next_logprobs(lm.state(prefix))) if use_lm else (lambda prefix: zeros)
    opts = {"beam": beam, "beam_threshold": beam_threshold, "lm_weight": lm_weight, "lm_bonus": lm_bonus}
    beams = _Beams([""], np.zeros(1), np.full(1, NEG_INF), np.zeros(1), np.zeros(1, int), lm_row("")[None])
    cols, col_lp, steps = _frame_plan(log_probs, prune_topk, prune_threshold, blank_skip)
    for kind, *args in steps:
        if kind == "skip":
            beams.blank_run(args[0])
        elif kind == "stay":
            beams.stay(log_probs[args[0]])
        else:
            t, n = args
            beams = beams.step(log_probs[t], cols[t, :n + 1], col_lp[t, :n + 1], opts, lm_row, chars)
            if not beams.prefixes:                                  # every labelling has probability 0
                return []
    return beams.nbest(lm_weight)


# ------------------------------------------------------------------------------------------ batches and tuning

BEAM_KEYS = tuple(inspect.signature(beam_search).parameters)[3:]    # beam, lm_weight, ... (config keys)
_WORKER = {}


def _beam_kwargs(cfg) -> dict:
    """The beam_search options found in a config mapping (e.g. the `decode:` section); others ignored."""
    return {k: cfg[k] for k in BEAM_KEYS if cfg is not None and k in cfg}


def _init_worker(charset, lm, kwargs):
    _WORKER.update(charset=charset, lm=lm, kwargs=kwargs)


def _decode_in_worker(log_probs):
    return beam_search(log_probs, _WORKER["charset"], _WORKER["lm"], **_WORKER["kwargs"])


def decode_batch(log_probs_list, charset, lm: CharNgramLM = None, cfg=None, workers: int = 1) -> list:
    """Beam-search each (T_i, C) array; returns one n-best list per line. `cfg` maps beam_search option
    names to values; workers > 1 decodes in a process pool (the LM is handed over once per worker)."""
    kwargs, chars = _beam_kwargs(cfg), _chars(charset)
    if workers <= 1 or len(log_probs_list) <= 1:
        return [beam_search(lp, chars, lm, **kwargs) for lp in log_probs_list]
    chunksize = max(1, len(log_probs_list) // (4 * workers))
    with mp.Pool(workers, initializer=_init_worker, initargs=(chars, lm, kwargs)) as pool:
        return pool.map(_decode_in_worker, log_probs_list, chunksize=chunksize)


def tune_lm_weights(val_log_probs, val_refs, charset, lm: CharNgramLM, weights, bonuses, cfg=None,
                    workers: int = 1) -> tuple:
    """Grid search of (lm_weight, lm_bonus) minimising corpus CER of the 1-best on a validation set.
    Returns (best_weight, best_bonus, table) with table = [{"lm_weight", "lm_bonus", "cer"}] in grid order."""
    table = []
    for w in weights:
        for b in bonuses:
            run_cfg = {**_beam_kwargs(cfg), "lm_weight": w, "lm_bonus": b}
            nbest = decode_batch(val_log_probs, charset, lm, run_cfg, workers)
            cer = corpus_cer(val_refs, [n[0][0] if n else "" for n in nbest])
            table.append({"lm_weight": w, "lm_bonus": b, "cer": cer})
            log.info("LM tuning: weight %.3g bonus %.3g -> CER %.4f", w, b, cer)
    best = min(table, key=lambda r: r["cer"])
    return best["lm_weight"], best["lm_bonus"], table

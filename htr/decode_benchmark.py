"""
Decoding speed benchmark (the library behind benchmark_decode.py): greedy vs CTC prefix beam search + character
n-gram LM, serial and in a process pool, on synthetic peaky posteriors (T=128, 80 classes) made from held-out
English text lines; the LM text is the docstrings of Python's standard library, rewrapped into handwriting-length
lines.
"""
import ast
import functools
import os
import random
import resource
import sysconfig
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

from htr.decoding import CharNgramLM, decode_batch, greedy_decode
from htr.metrics import corpus_cer

CHARSET = " " + "abcdefghijklmnopqrstuvwxyz" + "ABCDEFGHIJKLMNOPQRSTUVWXYZ" + "0123456789" + ".,;:'\"!?()-&/#*+"
CONFUSABLE = ["ec", "ao", "nu", "il", "rn", "vu", "hb", "gq", "O0", "l1", ".,", "mw", "tf"]


def text_lines(n: int, seed: int = 0) -> list:
    """n English lines of 20-65 characters from stdlib docstrings, shuffled."""
    paragraphs = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and ast.get_docstring(node):
                paragraphs += ast.get_docstring(node).split("\n\n")
    rng = random.Random(seed)
    lines = []
    for para in paragraphs:
        text = " ".join(para.split())
        if sum(ch.isalpha() or ch == " " for ch in text) < 0.9 * len(text):
            continue                                      # skip code samples and tables
        lines += [ln for ln in textwrap.wrap(text, rng.randint(45, 65)) if len(ln) >= 20 and set(ln) <= set(CHARSET)]
    rng.shuffle(lines)
    if len(lines) < n:
        raise SystemExit(f"only {len(lines)} text lines available, {n} asked")
    return lines[:n]


def synth_posteriors(line: str, rng: np.random.Generator, T: int = 128) -> np.ndarray:
    """(T, C) log-softmax like a trained CTC model: confident blanks between short character runs, and
    now and then a confusable character competing with (sometimes beating) the true one."""
    C = len(CHARSET) + 1
    cls = [CHARSET.index(ch) + 1 for ch in line][: T // 2]
    gaps = np.array([1 if i and cls[i - 1] == c else 0 for i, c in enumerate(cls)] + [0])   # (L+1,)
    runs = np.ones(len(cls), int)
    extra = rng.multinomial(T - gaps.sum() - runs.sum(), np.r_[np.full(len(gaps), 3.0), np.ones(len(runs))] /
                            (3 * len(gaps) + len(runs)))
    gaps, runs = gaps + extra[:len(gaps)], runs + extra[len(gaps):]
    target = np.concatenate([np.r_[np.zeros(g, int), np.full(r, c)] for g, c, r in zip(gaps, cls, runs)] +
                            [np.zeros(gaps[-1], int)])
    logits = rng.normal(0, 1, (T, C))
    rows = np.arange(T)
    logits[rows, target] += np.where(target == 0, rng.uniform(11, 17, T), rng.uniform(6, 12, T))
    for t in np.flatnonzero(target):
        pair = next((p for p in CONFUSABLE if CHARSET[target[t] - 1] in p), None)
        if pair and rng.random() < 0.3:
            other = CHARSET.index(pair[1 - pair.index(CHARSET[target[t] - 1])]) + 1
            logits[t, other] = logits[t, target[t]] + rng.normal(-1.0, 1.5)
    logits -= logits.max(1, keepdims=True)
    return (logits - np.log(np.exp(logits).sum(1, keepdims=True))).astype(np.float32)


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (pool workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def best_rates(run, n: int, repeat: int, setup=lambda: None) -> tuple:
    """Best of `repeat` runs of run(setup()), setup untimed: (output, lines/s, lines per CPU-second)."""
    walls, cpus = [], []
    for _ in range(repeat):
        arg = setup()
        wall, cpu = time.perf_counter(), cpu_seconds()
        out = run(arg)
        walls.append(time.perf_counter() - wall)
        cpus.append(cpu_seconds() - cpu)
    return out, round(n / min(walls), 1), round(n / min(cpus), 1)


def decode_benchmark(train_lines: int = 5000, lines: int = 1000, workers: int = 2, beam: int = 16, order: int = 6,
                     lm_weight: float = 0.5, lm_bonus: float = 0.5, repeat: int = 2) -> dict:
    """benchmark_decode.py's report: an n-gram LM of `order` fit on `train_lines` text lines, then greedy, beam
    without LM and beam + LM (serial and on `workers` processes, best of `repeat`) timed on `lines` more."""
    texts = text_lines(train_lines + lines)
    train, test = texts[:train_lines], texts[train_lines:]
    rng = np.random.default_rng(0)
    posteriors = [synth_posteriors(line, rng) for line in test]
    refs = [line[:64] for line in test]

    t0 = time.perf_counter()
    lm = CharNgramLM(CHARSET, order)
    lm.fit(train)
    fit_s = time.perf_counter() - t0
    cfg = {"beam": beam, "lm_weight": lm_weight, "lm_bonus": lm_bonus}
    n, load_before = len(posteriors), os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "lm.json")
        lm.save(path)
        size_mb = os.path.getsize(path) / 1e6
        t0 = time.perf_counter()
        CharNgramLM.load(path, CHARSET)
        load_s = time.perf_counter() - t0
        fresh_lm = functools.partial(CharNgramLM.load, path, CHARSET)   # a cold n-gram cache per run
        greedy, greedy_rate, _ = best_rates(lambda _: [greedy_decode(lp, CHARSET) for lp in posteriors], n, 1)
        no_lm = {"beam": beam}
        beam_only, beam_rate, _ = best_rates(lambda _: decode_batch(posteriors, CHARSET, None, no_lm), n, 1)
        serial, serial_rate, serial_cpu = best_rates(
            lambda m: decode_batch(posteriors, CHARSET, m, cfg), n, repeat, fresh_lm)
        pooled, pool_rate, pool_cpu = best_rates(
            lambda m: decode_batch(posteriors, CHARSET, m, cfg, workers), n, repeat, fresh_lm)
    assert pooled == serial
    return {
        "lines": n, "T": posteriors[0].shape[0], "classes": posteriors[0].shape[1], "cpu_count": os.cpu_count(),
        "lm": {"order": order, "train_lines": len(train), "fit_s": round(fit_s, 2),
               "file_mb": round(size_mb, 2), "load_s": round(load_s, 2)},
        "decode": cfg, "best_of": repeat,
        "load_avg_1min_before": round(load_before, 2),
        "greedy_lines_per_s": greedy_rate,
        "beam_no_lm_lines_per_s": beam_rate,
        "beam_lm_lines_per_s_1_worker": serial_rate,
        f"beam_lm_lines_per_s_{workers}_workers": pool_rate,
        "beam_lm_lines_per_cpu_s": {"serial": serial_cpu, "pool": pool_cpu},
        "cer": {"greedy": round(corpus_cer(refs, greedy), 4),
                "beam_no_lm": round(corpus_cer(refs, [b[0][0] for b in beam_only]), 4),
                "beam_lm": round(corpus_cer(refs, [b[0][0] for b in serial]), 4)},
    }

"""Corpus error rates: CER and WER as total edit distance / total reference length."""
from rapidfuzz.distance import Levenshtein

from utils import UserError

_TOKENIZER = None


def tokenize_words(text: str, mode: str) -> list:
    """'tokenizer': nltk's Treebank tokenizer (needs no downloaded data); 'space': split on whitespace."""
    global _TOKENIZER
    if mode == "space":
        return text.split()
    if mode != "tokenizer":
        raise UserError(f"eval.wer_mode must be 'tokenizer' or 'space', got {mode!r}")
    if _TOKENIZER is None:
        from nltk.tokenize import TreebankWordTokenizer
        _TOKENIZER = TreebankWordTokenizer()
    return _TOKENIZER.tokenize(text)


def edit_totals(refs, hyps) -> tuple:
    """(total edit distance, total reference length) over paired sequences: strings or token lists."""
    return sum(Levenshtein.distance(r, h) for r, h in zip(refs, hyps)), sum(len(r) for r in refs)


def corpus_cer(refs, hyps) -> float:
    edits, length = edit_totals(refs, hyps)
    return edits / max(length, 1)


def error_counts(refs, hyps, wer_mode: str = "tokenizer") -> dict:
    """Character and word edit totals and reference lengths: what adds up over shards of a corpus."""
    char_err, char_len = edit_totals(refs, hyps)
    word_err, word_len = edit_totals([tokenize_words(r, wer_mode) for r in refs],
                                     [tokenize_words(h, wer_mode) for h in hyps])
    return {"char_errors": char_err, "chars": char_len, "word_errors": word_err, "words": word_len}


def rates(counts: dict) -> dict:
    """Corpus CER and WER (total edit distance / total reference length) of error_counts, next to the counts."""
    return {"cer": counts["char_errors"] / max(counts["chars"], 1),
            "wer": counts["word_errors"] / max(counts["words"], 1), **counts}


def error_rates(refs, hyps, wer_mode: str = "tokenizer") -> dict:
    return rates(error_counts(refs, hyps, wer_mode))

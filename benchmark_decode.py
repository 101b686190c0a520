"""
Decoding speed benchmark: greedy vs CTC prefix beam search + character 6-gram LM, serial and in a process
pool, on synthetic peaky posteriors (T=128, 80 classes) made from held-out English text lines.
The LM text is the docstrings of Python's standard library, rewrapped into handwriting-length lines.

    python benchmark_decode.py [--lines 1000] [--workers 2] [--beam 16] [--order 6]

Prints one JSON object: lines/s over wall time (the network forward excluded; the pool timing includes
starting it, each worker's n-gram cache starts cold) and lines per CPU-second (per core, robust to other
load on the machine).
"""

import argparse
import json

from htr.decode_benchmark import decode_benchmark


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-lines", type=int, default=5000)
    ap.add_argument("--lines", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--beam", type=int, default=16)
    ap.add_argument("--order", type=int, default=6)
    ap.add_argument("--lm-weight", type=float, default=0.5)
    ap.add_argument("--lm-bonus", type=float, default=0.5)
    ap.add_argument("--repeat", type=int, default=2, help="best of this many timed runs with the LM")
    args = ap.parse_args()
    print(json.dumps(decode_benchmark(args.train_lines, args.lines, args.workers, args.beam, args.order, args.lm_weight,
                                      args.lm_bonus, args.repeat), indent=1))


if __name__ == "__main__":
    main()

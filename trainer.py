"""Train the recognizer: python trainer.py config.yaml [key.sub=value ...]

One device with plain `python trainer.py`; several processes with `accelerate launch --multi_gpu --num_processes N
trainer.py config.yaml` (GPUs, or CPU processes over gloo with device=cpu). SIGINT/SIGTERM once: last.pt is written
after the current step and the run exits (status 128 + signal); twice: it exits at once.
"""
import sys

from htr.training import train
from utils import config_from_cli, run_main


def main(argv=None):
    cfg, _ = config_from_cli(argv, "trainer.py")
    status = train(cfg)
    if status:
        sys.exit(status)


if __name__ == "__main__":
    run_main(main)

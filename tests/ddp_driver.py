"""Run by test_distributed.py under `accelerate launch`: train, then every process saves the weights it ended with.

    accelerate launch ... tests/ddp_driver.py config.yaml OUT_DIR [key=value ...]
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from htr.training import Trainer  # noqa: E402
from utils import load_config  # noqa: E402

t = Trainer(load_config(sys.argv[1], sys.argv[3:]))
t.fit()
torch.save(t.acc.unwrap_model(t.model).state_dict(), Path(sys.argv[2]) / f"rank{t.acc.process_index}.pt")

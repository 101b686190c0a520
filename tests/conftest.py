"""Shared test helpers: tiny line datasets rendered with OpenCV, and a tiny model config."""
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# The default architecture scaled down to test size (same token kinds: blocks, pools, both MobileViT blocks).
TINY = ["preproc.image_height=32", "preproc.image_width=256", "arch.stem_channels=8",
        "arch.cnn_cfg=[[1,8],'M','mobilevit1',[1,16],'M','mobilevit2',[1,32]]",
        "arch.mobilevit.dim=16", "arch.mobilevit.heads=2", "arch.mobilevit.mlp_dim=32",
        "arch.rnn_layers=2", "arch.rnn_hidden_size=32", "train.num_workers=0", "eval.num_workers=0",
        "train.use_llm=false", "train.augment=false", "train.batch_size=4", "train.val_every_k_epochs=1",
        "train.scheduler=none", "train.lr=3e-3", "device=cpu", "seed=0"]

WORDS = ["ab", "ba", "cab", "bad", "add", "dab", "cd", "dc", "abc", "bcd"]
INK, PAPER = 20, 235                                                       # render_line's grey levels


def render_line(text: str, height: int = 40) -> np.ndarray:
    """Dark text on a light background, like a scanned line."""
    width = 20 + 22 * len(text)
    img = np.full((height, width), PAPER, np.uint8)
    cv2.putText(img, text, (10, height - 12), cv2.FONT_HERSHEY_SIMPLEX, 0.9, INK, 2, cv2.LINE_AA)
    return img


def coverage(grey: np.ndarray) -> np.ndarray:
    """Ink coverage (h, w, 1) in [0, 1] of a render_line image."""
    return ((PAPER - grey.astype(float)) / (PAPER - INK))[..., None]


def in_colour(grey: np.ndarray) -> np.ndarray:
    """A render_line image as dark blue ink on beige paper (BGR uint8, h x w x 3), its luma close to the grey."""
    blue, beige = np.array([140, 10, 10]), np.array([200, 235, 250])         # luma ~25 and ~235
    return np.rint(beige + (blue - beige) * coverage(grey)).astype(np.uint8)


def write_split(root: Path, split: str, texts) -> Path:
    d = root / split
    d.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, text in enumerate(texts):
        cv2.imwrite(str(d / f"{split}-{i:03d}.png"), render_line(text))
        lines.append(f"{split}-{i:03d} {text}")
    (d / "gt.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return d


def tiny_setup(tmp: Path, run_name: str = "tiny", test_texts=WORDS[:2] + WORDS[8:]) -> tuple:
    """A tiny dataset under tmp/lines and the overrides that train on it into tmp/runs/<run_name>."""
    root = tmp / "lines"
    write_split(root, "train", WORDS[:8])
    write_split(root, "val", WORDS[8:])
    write_split(root, "test", test_texts)
    return root, TINY + [f"data.path={root}", f"model.save_dir={tmp / 'runs'}", f"model.run_name={run_name}"]


@pytest.fixture
def tiny_data(tmp_path) -> Path:
    return tiny_setup(tmp_path)[0]


@pytest.fixture
def tiny_overrides(tiny_data, tmp_path) -> list:
    return TINY + [f"data.path={tiny_data}", f"model.save_dir={tmp_path / 'runs'}", "model.run_name=tiny"]


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """accelerate keeps one process-wide state whose mixed precision cannot change; a trainer script builds one
    per process, the tests build many (with different train.mixed_precision)."""
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)

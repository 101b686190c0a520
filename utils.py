"""What the scripts share: config and CLI, devices and precision, the character set, checkpoint I/O."""
import difflib
import logging
import os
import sys
import unicodedata
from pathlib import Path

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException


class UserError(Exception):
    """A problem the user can fix (bad config, missing file, ...): printed as one line, no traceback."""


def run_main(main, log_level=logging.INFO):
    """Call main(); turn a UserError into one readable line on stderr and exit status 2."""
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


# ----------------------------------------------------------------------------------------------------------- config

def _key_paths(node, prefix: str = "") -> list:
    paths = []
    for key, value in node.items():
        path = f"{prefix}{key}"
        paths.append(path)
        if isinstance(value, DictConfig):
            paths += _key_paths(value, path + ".")
    return paths


def _load_yaml(path: Path) -> DictConfig:
    """Load a YAML file; a `base: other.yaml` key merges this file on top of that one (relative path)."""
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    cfg = OmegaConf.load(path)
    base = cfg.pop("base", None)
    if base is None:
        return cfg
    return _merge(_load_yaml(path.parent / base), cfg, str(path))


def _merge(base: DictConfig, update, source: str) -> DictConfig:
    OmegaConf.set_struct(base, True)
    try:
        return OmegaConf.merge(base, update)
    except ConfigKeyError as e:
        key = e.full_key or str(e.key)
        close = difflib.get_close_matches(key, _key_paths(base), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see config.yaml for the valid keys"
        raise UserError(f"unknown config key '{key}' in {source}{hint}") from None
    except OmegaConfBaseException as e:
        raise UserError(f"bad config value in {source}: {e.msg if hasattr(e, 'msg') else e}") from None


def load_config(path, overrides=()) -> DictConfig:
    """config.yaml + dotted `key.sub=value` overrides, in struct mode: an unknown key fails with close matches."""
    cfg = _load_yaml(Path(path))
    for item in overrides:
        if "=" not in item:
            raise UserError(f"expected key=value, got {item!r} (e.g. train.lr=1e-3)")
        cfg = _merge(cfg, OmegaConf.from_dotlist([item]), f"override {item!r}")
    return cfg


def split_cli(argv) -> tuple:
    """`script.py config.yaml [key=value ...] [positional ...]` -> (config path, overrides, positionals)."""
    if not argv or "=" in argv[0]:
        raise UserError("usage: python SCRIPT.py config.yaml [key=value ...]")
    overrides = [a for a in argv[1:] if "=" in a]
    positionals = [a for a in argv[1:] if "=" not in a]
    return argv[0], overrides, positionals


def config_from_cli(argv, script: str, need_resume: bool = False, positionals: bool = False) -> tuple:
    """`script.py config.yaml [key=value ...] [positional ...]` -> (config, positionals), with clear errors."""
    cfg_path, overrides, extra = split_cli(sys.argv[1:] if argv is None else argv)
    if extra and not positionals:
        raise UserError(f"unexpected arguments {extra}; {script} takes config.yaml and key=value overrides")
    cfg = load_config(cfg_path, overrides)
    if need_resume and not cfg.resume:
        raise UserError("no checkpoint given: add resume=PATH/TO/best.pt")
    return cfg, extra


def to_plain(node):
    """OmegaConf node -> plain dict/list (for checkpoints and JSON)."""
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, (DictConfig, ListConfig)) else node


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={name} but CUDA is not available here (torch {torch.__version__}); "
                        f"use device=cpu or device=auto")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"device={name!r} is not a valid device; use auto, cpu, cuda or cuda:N") from None


def use_fixed_size_kernels(device: torch.device) -> None:
    """Every line is padded to one size, so on CUDA let cuDNN time its convolution algorithms once and keep the
    fastest (cudnn.benchmark); nothing to do on the CPU."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def native_bf16(device: torch.device) -> bool:
    """Whether the device computes in bf16 natively: a CUDA GPU that supports it, or a CPU with AMX or AVX512-BF16
    (oneDNN's bf16 convolutions and matmuls there run ~3x faster than fp32; elsewhere bf16 is emulated, slower)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()


def mixed_precision(setting, device: torch.device, key: str) -> str:
    """train/eval.mixed_precision: auto (bf16 where the device has it natively, else fp32) | no | bf16 | fp16."""
    if setting is False:                                      # YAML reads a bare `no` as false
        return "no"
    if setting == "auto":
        return "bf16" if native_bf16(device) else "no"
    if setting not in ("no", "bf16", "fp16"):
        raise UserError(f"{key} must be auto, no, bf16 or fp16, got {setting!r}")
    return setting


def autocast_dtype(setting, device: torch.device, key: str = "eval.mixed_precision"):
    """The torch.autocast dtype for a mixed_precision setting; None = fp32."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision(setting, device, key))


def train_memory_format(setting, device: torch.device) -> torch.memory_format:
    """train.channels_last: true | false | auto = channels_last on CUDA and on AVX-512 CPUs. On an AVX2-only CPU
    oneDNN's channels_last weight-gradient convolution is ~2x slower than its blocked kernels behind NCHW tensors;
    with AVX-512 (and AMX) its channels_last kernels are the fast ones."""
    if setting not in (True, False, "auto"):
        raise UserError(f"train.channels_last must be true, false or auto, got {setting!r}")
    if setting == "auto":
        setting = device.type == "cuda" or torch.backends.cpu.get_cpu_capability() == "AVX512"
    return torch.channels_last if setting else torch.contiguous_format


# --------------------------------------------------------------------------------------------------------- charset

def normalize_text(text: str) -> str:
    return unicodedata.normalize("NFC", text)


class Charset:
    """Characters of the recognizer; class 0 is the CTC blank, class i is chars[i-1]."""

    def __init__(self, chars: str):
        self.chars = chars
        self.index = {c: i + 1 for i, c in enumerate(chars)}

    @classmethod
    def from_texts(cls, texts) -> "Charset":
        return cls("".join(sorted(set("".join(texts)))))

    def __len__(self) -> int:
        return len(self.chars) + 1     # + blank

    def unknown(self, text: str) -> set:
        return {c for c in text if c not in self.index}

    def encode(self, text: str) -> list:
        """Unknown characters are dropped (the caller reports them)."""
        return [self.index[c] for c in text if c in self.index]

    def decode(self, ids) -> str:
        return "".join(self.chars[i - 1] for i in ids if i != 0)


# ----------------------------------------------------------------------------------------------------- checkpoints

def save_checkpoint(state: dict, path) -> None:
    """Atomic: write a temp file in the same directory, fsync, rename over the target."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path} (set resume=PATH to an existing .pt file)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0]}") from None


def check_compatible(ckpt: dict, cfg: DictConfig, path, charset: Charset = None) -> None:
    """Fail with what differs when a checkpoint does not match the config's architecture (or the data's charset)."""
    diffs = [f"{section}.{k}: checkpoint {ckpt[section].get(k)!r} vs config {v!r}"
             for section in ("arch", "preproc") for k, v in to_plain(cfg[section]).items()
             if ckpt[section].get(k) != v]
    if diffs:
        raise UserError(f"checkpoint {path} was trained with another architecture: " + "; ".join(diffs)
                        + ". Use the config it was trained with (saved as config.yaml in its run directory).")
    if charset is not None and charset.chars != ckpt["charset"]:
        added = sorted(set(charset.chars) - set(ckpt["charset"]))
        missing = sorted(set(ckpt["charset"]) - set(charset.chars))
        raise UserError(f"checkpoint {path} has another character set than this data: characters new in the data "
                        f"{''.join(added)!r}, not in the data {''.join(missing)!r}. Train a new model, or point "
                        f"data.path at the data this checkpoint was trained on.")

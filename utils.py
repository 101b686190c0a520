"""What the scripts share: config and CLI, devices and precision, the character set, checkpoint I/O."""
import contextlib
import difflib
import json
import logging
import math
import os
import shutil
import sys
import unicodedata
from pathlib import Path

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

log = logging.getLogger("htr")


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


def cpu_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs' worth of time this process's cgroup may use (cgroup v2 cpu.max, v1 cpu.cfs_quota_us / period: a
    container's --cpus), None when unlimited or unknown."""
    try:
        if (root / "cpu.max").is_file():
            quota, period = (root / "cpu.max").read_text().split()[:2]
        else:
            quota, period = ((root / "cpu" / f"cpu.cfs_{k}_us").read_text().strip() for k in ("quota", "period"))
    except (OSError, ValueError):
        return None
    return None if quota in ("max", "-1") else int(quota) / int(period)


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask (taskset, cgroups, SLURM) and its cgroup's CPU quota, not
    the machine's count."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = cpu_quota()
    return max(1, min(cpus, math.ceil(quota))) if quota else cpus


def set_torch_threads(requested: int, workers: int, key: str, processes: int = 1) -> int:
    """PyTorch's intra-op threads: `requested`, or for 0 the CPUs this process may use (shared by `processes`)
    less the loader `workers`, at least 1; set and logged. More threads than free cores is what slowed training
    15-20x when another process took a core: every parallel region waits for the thread that lost its core."""
    usable = usable_cpus() // processes
    threads = requested or max(1, usable - workers)
    torch.set_num_threads(threads)
    log.info("%d PyTorch thread(s) beside %d loader worker(s) on %d usable CPU(s) (%s=%d%s)", threads, workers,
             usable, key, requested, "" if requested else ": auto")
    return threads


def use_fixed_size_kernels(device: torch.device) -> None:
    """Every line is padded to one size, so on CUDA let cuDNN time its convolution algorithms once and keep the
    fastest (cudnn.benchmark); nothing to do on the CPU."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def require_cpp_compiler(device: torch.device, setting: str, way_out: str) -> None:
    """torch.compile on the CPU writes and builds C++ (inductor): without a compiler it fails at the first step,
    deep inside torch, so say it up front."""
    if device.type == "cpu" and not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "clang++")):
        raise UserError(f"{setting} builds C++ code on the CPU (torch.compile) and finds no C++ compiler (g++, "
                        f"clang++ or $CXX): install one (e.g. `apt install g++`) or {way_out}")


def make_optimizer(params, lr: float, weight_decay: float = 0.01) -> torch.optim.AdamW:
    """AdamW with its fused kernel (one op per step for all parameters, on the CPU as on CUDA). On a 2-core EPYC a
    step over the quick model + Q-Former connector (8.0 M parameters) takes 5.6 ms, 16.6 ms with the default loop."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)


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

@contextlib.contextmanager
def atomic_write(path, mode: str = "wb"):
    """Write `path` all or nothing: a temp file beside it (unique per process), fsync, rename over the target. On
    any error the temp file is removed and the previous file is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8", "newline": ""})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def remove_stale_temp_files(directory) -> list:
    """Temp files that a killed process left behind in `directory` (atomic_write's names)."""
    stale = sorted(Path(directory).glob(".*.tmp[0-9]*"))
    for f in stale:
        f.unlink(missing_ok=True)
    return stale


def save_checkpoint(state: dict, path) -> None:
    """Atomic (atomic_write); a full disk or another OSError keeps the previous checkpoint and is one UserError."""
    try:
        with atomic_write(path) as f:
            torch.save(state, f)
    except OSError as e:
        raise UserError(f"cannot write checkpoint {path}: {e.strerror or e}; the previous checkpoint (if any) is "
                        f"kept. Free disk space (or set model.save_dir) and resume from it") from None


INFERENCE_KEYS = ("model", "charset", "arch", "preproc")
RESUME_KEYS = INFERENCE_KEYS + ("optimizer", "scheduler", "epoch", "step", "best_cer", "bad_validations", "rng")


def read_json(path: Path) -> dict:
    """A JSON object file of a run (run_info.json, an evaluation report), or {} (with a warning if it exists but is
    unreadable, and then left out)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        log.warning("%s left out: %s", path, e)
        return {}
    return data if isinstance(data, dict) else {}


def load_checkpoint(path, keys=INFERENCE_KEYS) -> dict:
    """A checkpoint written by trainer.py, with at least `keys`; anything else is one UserError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path} (set resume=PATH to an existing .pt file)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = (str(e).strip() or type(e).__name__).splitlines()[0]
        raise UserError(f"cannot read checkpoint {path} (truncated or not a checkpoint of this project?): "
                        f"{type(e).__name__}: {reason}") from None
    missing = [k for k in keys if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise UserError(f"checkpoint {path} lacks {', '.join(missing)}: it was not written by trainer.py (or by "
                        f"an incompatible version); use another checkpoint, e.g. best.pt or last.pt of a run")
    return ckpt


def comparable(section: str, key: str, value):
    """A setting as check_compatible compares it: an audio branch that is off (or absent: checkpoints from before
    it) is one and the same whatever its other settings."""
    if (section, key) == ("arch", "audio") and not (value or {}).get("enabled"):
        return None
    return value


def check_compatible(ckpt: dict, cfg: DictConfig, path, texts=None, sections=("arch", "preproc"),
                     ignore=()) -> None:
    """Fail with what differs when a checkpoint does not match the config's `sections` (but the keys in `ignore`,
    e.g. "arch.audio"), or when training `texts` hold characters the checkpoint's charset lacks."""
    diffs = [f"{section}.{k}: checkpoint {ckpt[section].get(k)!r} vs config {v!r}"
             for section in sections for k, v in to_plain(cfg[section]).items() if f"{section}.{k}" not in ignore
             and comparable(section, k, ckpt[section].get(k)) != comparable(section, k, v)]
    if diffs:
        raise UserError(f"checkpoint {path} was trained with another architecture: " + "; ".join(diffs)
                        + ". Use the config it was trained with (saved as config.yaml in its run directory).")
    new = Charset(ckpt["charset"]).unknown("".join(texts or ()))
    if new:
        raise UserError(f"checkpoint {path} has another character set: this training data has characters it "
                        f"lacks, {''.join(sorted(new))!r}. To fine-tune on this data start a new run with "
                        f"train.init_from={path}; to continue that run point data.path at its data.")

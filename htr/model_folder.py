"""Model folders: a trained recognizer as plain files, in the layout the Hugging Face Hub hosts as it is.

    model.safetensors   the HTRNet state_dict as trained (BatchNorm not folded); tensors only, no pickle
    config.yaml         arch and preproc (a loaded folder brings them: they replace the user's config's),
                        eval and decode defaults (for reference; the command line's settings apply),
                        training_data: the data of every training stage (htr/training_data.py)
    charset.txt         the characters in class order (class i is the i-th character, class 0 the CTC blank):
                        UTF-8, one string without separators and without a final newline (the format of a run's
                        charset.txt); a final newline an editor adds is ignored, since no charset holds one
    char_lm.json.gz     the character n-gram LM for decode.mode=beam, if the run had one
    README.md           the model card (export.py writes it)

export.py export.format=folder writes one; `resume=` of evaluate/demo/transcribe/serve and trainer.py's
`train.init_from` take the folder or, once uploaded (hf upload USER/NAME FOLDER), its Hub id, fetched by
huggingface_hub into its cache (read_model_folder).
"""
import re
import shutil
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from htr.training_data import KEY as TRAINING_DATA
from utils import UserError, atomic_write

WEIGHTS, CONFIG, CHARSET, LM, CARD = "model.safetensors", "config.yaml", "charset.txt", "char_lm.json.gz", "README.md"
REQUIRED = (WEIGHTS, CONFIG, CHARSET)
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")                       # user/name, as the Hub spells repo ids
HUB_TIMEOUT = 5                   # seconds for the Hub's metadata request (huggingface_hub's etag_timeout)


def write_charset(path, chars: str) -> None:
    if "\n" in chars:
        raise UserError(f"the charset holds a newline, which {CHARSET} cannot store: {chars!r}")
    with atomic_write(path, "w") as f:
        f.write(chars)


def read_charset(path) -> str:
    """charset.txt exactly as written: no newline translation, only an editor's final newline dropped."""
    return re.sub(r"\r?\n\Z", "", Path(path).read_bytes().decode("utf-8"))


def save_model_folder(out_dir, state: dict, chars: str, config: dict, lm=None) -> Path:
    """Write weights, config.yaml, charset.txt and (if given) a copy of the LM file into out_dir."""
    from safetensors.torch import save_file
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out_dir / WEIGHTS), metadata={"format": "pt"})
    with atomic_write(out_dir / CONFIG, "w") as f:
        f.write("# Written by export.py. arch and preproc replace the user's config when this folder is loaded\n"
                "# (resume=FOLDER); eval and decode are the exporter's defaults, for reference.\n")
        f.write(OmegaConf.to_yaml(config))
    write_charset(out_dir / CHARSET, chars)
    if lm is not None:
        shutil.copyfile(lm, out_dir / LM)
    return out_dir


def model_folder(resume, key: str = "resume") -> Path | None:
    """The local model folder `resume` (the value of `key`) names: the folder itself, or a Hub id's snapshot; None
    for a file path."""
    path = Path(str(resume))
    if path.is_dir():
        return path
    if path.exists() or path.suffix in (".pt", ".onnx") or not HUB_ID.fullmatch(str(resume)):
        return None
    return fetch_from_hub(str(resume), key)


def fetch_from_hub(repo_id: str, key: str = "resume") -> Path:
    """Download (or find in huggingface_hub's cache) the model folder files of a Hub repo; one UserError naming
    `key` if not."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError
    where = f"{key}={repo_id} is no local file or folder, and as a Hugging Face Hub id"
    try:
        return Path(snapshot_download(repo_id, allow_patterns=[*REQUIRED, LM, CARD], etag_timeout=HUB_TIMEOUT))
    except LocalEntryNotFoundError:
        reason = "HF_HUB_OFFLINE is set" if constants.is_offline_mode() else "the Hub cannot be reached"
        raise UserError(f"{where} it cannot be fetched: {reason} and it is not in the cache "
                        f"{constants.HF_HUB_CACHE}. Download it where the Hub is reachable (hf download {repo_id} "
                        f"--local-dir DIR), bring DIR here and pass {key}=DIR") from None
    except RepositoryNotFoundError:
        raise UserError(f"{where} it is not on the Hub (or private: hf auth login); {key}= takes a .pt "
                        f"checkpoint, a model folder (export.py export.format=folder) or a Hub id") from None
    except (HFValidationError, OSError) as e:
        raise UserError(f"{where} it cannot be fetched: {str(e).strip().splitlines()[0]}") from None


def read_model_folder(folder: Path) -> dict:
    """A model folder as a checkpoint-like dict: model (state_dict), charset, arch, preproc, lm (path or None)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    missing = [name for name in REQUIRED if not (folder / name).is_file()]
    if missing:
        raise UserError(f"{folder} is not a model folder: it lacks {', '.join(missing)} (write one with python "
                        f"export.py config.yaml resume=CKPT export.format=folder OUT_DIR)")
    try:
        config = OmegaConf.load(folder / CONFIG)
        arch, preproc = OmegaConf.to_container(config.arch), OmegaConf.to_container(config.preproc)
    except (OmegaConfBaseException, AttributeError, ValueError, OSError) as e:
        raise UserError(f"{folder / CONFIG}: no usable arch and preproc sections ({e})") from None
    try:
        state = load_file(str(folder / WEIGHTS))
        chars = read_charset(folder / CHARSET)
    except (SafetensorError, OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read model folder {folder}: {type(e).__name__}: {e}") from None
    lm = folder / LM
    stages = config.get(TRAINING_DATA)                                   # htr/training_data.py's record, if any
    return {"model": state, "charset": chars, "arch": arch, "preproc": preproc, "lm": lm if lm.is_file() else None,
            **({TRAINING_DATA: OmegaConf.to_container(stages)} if stages is not None else {})}


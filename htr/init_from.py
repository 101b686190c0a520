"""train.init_from: a new run that starts from another model's weights (fine-tuning), given as a trainer.py
checkpoint, a model folder (export.py export.format=folder) or its Hub id. Its optimizer and schedule are not
taken; its characters are kept beside the new data's (train.init_resize=union) or dropped (new)."""
import logging

from htr.inference import adopt_folder_settings
from htr.model_folder import model_folder, read_model_folder
from utils import UserError, check_compatible, comparable, load_checkpoint, to_plain

log = logging.getLogger("htr")


def init_checkpoint(cfg):
    """(checkpoint, path) of the model train.init_from names, or None. A model folder or Hub id brings its
    architecture, as from_pretrained does: its arch and preproc replace cfg's, in place (but an audio branch the
    folder lacks), before the datasets are opened at its size."""
    path = cfg.train.init_from
    if not path:
        return None
    if cfg.resume:
        raise UserError("train.init_from starts a new run from other weights, resume= continues a run: "
                        "give one of them")
    folder = model_folder(path, "train.init_from")
    if folder is None:
        return load_checkpoint(path), path
    ckpt = read_model_folder(folder)
    grows = comparable("arch", "audio", ckpt["arch"].get("audio")) is None
    adopt_folder_settings(cfg, ckpt, folder, keep=("arch.audio",) if grows else (), lm=False)
    return ckpt, folder


def init_weights(model, llm, ckpt: dict, path, cfg, chars: str) -> None:
    """The recognizer's weights (resized to `chars`), and the connector's when both runs have the LLM path (an
    align run's); an image-only model's weights start a model with the audio branch, the branch itself fresh."""
    grows = model.has_audio and comparable("arch", "audio", ckpt["arch"].get("audio")) is None
    check_compatible(ckpt, cfg, path, sections=("arch",), ignore=("arch.audio",) if grows else ())
    try:
        model.load_resized(ckpt["model"], ckpt["charset"], chars)
    except ValueError as e:
        raise UserError(f"train.init_from={path}: another architecture ({e}); use its arch settings "
                        f"(config.yaml in its run directory)") from None
    if llm is not None and "llm" in ckpt:
        try:
            llm.load_trainable_state_dict(ckpt["llm"]["trainable"])
        except ValueError as e:
            raise UserError(f"train.init_from={path}: {e}{llm_differences(ckpt, cfg)}") from None
        log.info("connector from %s (trained for llm.name=%s)", path, ckpt["llm"]["name"])
    shared = set(ckpt["charset"]) & set(chars)
    log.info("initialised from %s: %d of %d characters shared, %d new%s", path, len(shared), len(chars),
             len(chars) - len(shared), "; the audio branch starts fresh" if grows else "")


def llm_differences(ckpt: dict, cfg) -> str:
    """The llm.* settings of the checkpoint's run that differ here, as overrides to copy ('' when none differ)."""
    saved, here = leaves(ckpt.get("config", {}).get("llm", {}), "llm."), leaves(to_plain(cfg.llm), "llm.")
    diffs = [f"{k}={v}" for k, v in saved.items() if here.get(k) != v]
    return f"; its run had {' '.join(diffs)}" if diffs else ""


def leaves(node: dict, prefix: str = "") -> dict:
    """{dotted key: value} of a nested dict's leaves."""
    out = {}
    for key, value in node.items():
        out.update(leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out

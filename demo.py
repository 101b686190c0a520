"""Transcribe line images: python demo.py config.yaml resume=run/best.pt IMG [IMG ...]

Prints `<file>\t<transcription>\t<confidence>` per image (and the ground truth when a gt.txt beside the image
has it). Any size; grey, colour or palette, transparent (composited on white), 8 or 16 bit, dark ink on light or
light on dark; png/jpg/tif/... An image that makes a poor single line (a word, a paragraph or page, a very long line)
is transcribed with a warning on stderr that says how it was scaled.
"""
import logging
from pathlib import Path

from htr.images import load_for_inference
from htr.decoding import greedy_decode, line_confidence
from htr.inference import line_log_probs
from htr.onnx_runtime import load_recognizer
from utils import UserError, autocast_dtype, config_from_cli, resolve_device, run_main


def ground_truth(image: Path):
    """The transcription of `image` in a gt.txt beside it, if there is one."""
    gt = image.parent / "gt.txt"
    if not gt.is_file():
        return None
    for line in gt.read_text(encoding="utf-8", errors="replace").splitlines():
        line_id, _, text = line.partition(" ")
        if line_id == image.stem:
            return text.strip()
    return None


def transcribe(model, charset, paths, cfg) -> list:
    dtype = autocast_dtype(cfg.eval.mixed_precision, resolve_device(cfg.device))
    results = []
    for path in paths:
        try:
            x = load_for_inference(path, cfg.preproc.image_height, cfg.preproc.image_width)
        except ValueError as e:
            raise UserError(f"{path}: {e} (expected an image file OpenCV can read: png, jpg, tif, ...)") from None
        log_probs = line_log_probs(model, x.unsqueeze(0), True, dtype)[0]  # (T, K)
        results.append((greedy_decode(log_probs, charset), line_confidence(log_probs)))
    return results


def main(argv=None):
    cfg, images = config_from_cli(argv, "demo.py", need_resume=True, positionals=True)
    if not images:
        raise UserError("no image given: python demo.py config.yaml resume=CKPT IMG [IMG ...]")
    device = resolve_device(cfg.device)
    model, charset = load_recognizer(cfg, cfg.resume, cfg.runtime, device, channels_last=True)
    paths = [Path(p) for p in images]
    for path, (text, conf) in zip(paths, transcribe(model, charset, paths, cfg)):
        print(f"{path}\t{text}\t{conf:.3f}")
        gt = ground_truth(path)
        if gt is not None:
            print(f"{'':>{len(str(path))}}\t{gt}\t(ground truth)")


if __name__ == "__main__":
    run_main(main, logging.WARNING)

"""Transcribe line images: python demo.py config.yaml resume=run/best.pt IMG [IMG ...]

Prints `<file>\t<transcription>\t<confidence>` per image (and the ground truth when a gt.txt beside the image
has it). Any size; grey, colour or palette, transparent (composited on white), 8 or 16 bit, dark ink on light or
light on dark; png/jpg/tif/... An image that makes a poor single line (a word, a paragraph or page, a very long line)
is transcribed with a warning on stderr that says how it was scaled.
"""
import logging
from pathlib import Path

from htr.inference import ground_truth, transcribe
from htr.onnx_runtime import load_recognizer
from utils import UserError, config_from_cli, resolve_device, run_main


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

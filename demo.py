"""Transcribe line images: python demo.py config.yaml resume=run/best.pt IMG [--audio WAV] [IMG [--audio WAV] ...]

Prints `<file>\t<transcription>\t<confidence>` per image (and the ground truth when a gt.txt beside the image
has it). Any size; grey, colour or palette, transparent (composited on white), 8 or 16 bit, dark ink on light or
light on dark; png/jpg/tif/... An image that makes a poor single line (a word, a paragraph or page, a very long line)
is transcribed with a warning on stderr that says how it was scaled.

With a model trained with the audio branch (arch.audio.enabled), `--audio WAV` (or .flac) after an image reads the
line from both, and `--audio WAV` with no image before it reads a line from its spoken reading alone.
"""
import logging
from pathlib import Path

from htr.inference import ground_truth, transcribe
from htr.onnx_runtime import load_recognizer
from utils import UserError, config_from_cli, resolve_device, run_main


def parse_args(argv=None) -> tuple:
    """-> (config, [(image, audio)]): --audio WAV belongs to the image just before it, or stands alone."""
    cfg, args = config_from_cli(argv, "demo.py", need_resume=True, positionals=True)
    items, tokens = [], iter(args)
    for token in tokens:
        if token != "--audio":
            items.append((Path(token), None))
            continue
        audio = next(tokens, None)
        if audio is None:
            raise UserError("--audio needs a file: ... line.png --audio line.wav")
        if items and items[-1][0] is not None and items[-1][1] is None:
            items[-1] = (items[-1][0], Path(audio))
        else:
            items.append((None, Path(audio)))
    if not items:
        raise UserError("no image given: python demo.py config.yaml resume=CKPT IMG [--audio WAV] [IMG ...]")
    return cfg, items


def main(argv=None):
    cfg, items = parse_args(argv)
    device = resolve_device(cfg.device)
    model, charset = load_recognizer(cfg, cfg.resume, cfg.runtime, device, channels_last=True)
    for (image, audio), (text, conf) in zip(items, transcribe(model, charset, items, cfg)):
        name = " + ".join(str(p) for p in (image, audio) if p is not None)
        print(f"{name}\t{text}\t{conf:.3f}")
        gt = ground_truth(image or audio)
        if gt is not None:
            print(f"{'':>{len(name)}}\t{gt}\t(ground truth)")


if __name__ == "__main__":
    run_main(main, logging.WARNING)

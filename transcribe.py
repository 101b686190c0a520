"""Transcribe pages (PAGE-XML / ALTO with their images) and line images with a trained recognizer.

    python transcribe.py config.yaml resume=MODEL INPUT [INPUT ...] --out DIR [--overwrite] [--images DIR]
        [--audio DIR] [key=value ...]

INPUT: PAGE (2010-2019) or ALTO (v2-v4) files, line images, or folders searched recursively: a folder with *.xml
files is a folder of pages (its images are page images), one without is a folder of line images. A page's image is
found as prepare_pages.py finds it (the file its XML names, else by the XML's name, next to the XML, then under the
input folder or its parent; --images DIR searches DIR instead). Lines are cut along their polygons with the same
baseline-band / bounding-box fallbacks as for training.

Output under --out DIR: each XML under its own name (files inside an input folder keep their path relative to it)
with the recognised text of every line written where its schema wants it, everything else kept (see htr/pagexml.py:
PAGE adds a TextEquiv with `conf`, ALTO writes String/SP with WC); lines that already have text keep it unless
--overwrite (PAGE 2016+ keeps both: the new TextEquiv gets the next @index). Line images go to
DIR/transcriptions.tsv (path, text, confidence). DIR/summary.json and the printed summary count pages, lines,
fallbacks and skips (malformed XML, no image, image size mismatch, unreadable image: per file, never fatal) and the
throughput (lines/s, pages/min, from the start of the worker processes to the last file written).

--audio DIR (a model trained with arch.audio): a line whose reading DIR holds, as <line id>.wav or .flac (the
TextLine id of a PAGE/ALTO line, in DIR/<xml file stem>/ or DIR itself; a line image's file stem), is read from
its image and its audio; an unusable reading is a warning and the line is read from its image alone.

Runs batches of eval.batch_size lines through the model given as resume= (runtime=torch: a checkpoint on `device`,
with eval.mixed_precision; runtime=onnx: an export.py model on the CPU, faster there, int8 fastest: see docs/transcription.md)
while eval.num_workers processes read and cut pages, decode and write; on the CPU the model gets the CPUs the
workers leave (at least one thread). Decoding is greedy, or with decode.mode=beam
CTC beam search with the character LM as evaluate.py loads it (decode.lm_path or char_lm.json.gz beside the model;
decode.lm_weight, lm_bonus, beam ...). Confidence: the line's mean best-path character posterior; ALTO WC per word
(greedy: the mean over its characters; beam: the line's).
"""
import argparse
import logging
from pathlib import Path

from htr.transcription import transcribe_inputs
from utils import UserError, config_from_cli, run_main


def parse_args(argv=None) -> tuple:
    """-> (config, inputs, flags); the flags may stand anywhere among `config.yaml key=value ... INPUT ...`."""
    parser = argparse.ArgumentParser(prog="transcribe.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="output folder (XML copies, transcriptions.tsv, summary.json)")
    parser.add_argument("--overwrite", action="store_true", help="replace the lines' existing text")
    parser.add_argument("--images", type=Path, help="folder searched recursively for the page images")
    parser.add_argument("--audio", type=Path, help="folder of per-line readings, <line id>.wav or .flac (in it or "
                                                   "in <page file name>/), for a model with arch.audio")
    flags, rest = parser.parse_known_args(argv)
    unknown = [a for a in rest if a.startswith("--")]
    if unknown:
        raise UserError(f"unknown option {unknown[0]}; transcribe.py takes --out DIR, --overwrite, --images DIR, "
                        f"--audio DIR")
    cfg, inputs = config_from_cli(rest, "transcribe.py", need_resume=True, positionals=True)
    if flags.out is None:
        raise UserError("no output folder: add --out DIR")
    if not inputs:
        raise UserError("nothing to transcribe: give PAGE/ALTO files, line images or folders of them")
    for name in ("images", "audio"):
        if getattr(flags, name) is not None and not getattr(flags, name).is_dir():
            raise UserError(f"--{name} folder not found: {getattr(flags, name)}")
    return cfg, inputs, flags


def main(argv=None) -> None:
    transcribe_inputs(*parse_args(argv))


if __name__ == "__main__":
    run_main(main, logging.WARNING)

"""Crop IAM handwriting lines from the form images into the shared line-data format.

    python prepare_iam.py FORMS_DIR XML_DIR SPLITS_DIR OUT_DIR [--scale 0.5] [--margin 8]
        [--drop-seg-errors] [--lines-txt PATH] [--workers N]

FORMS_DIR holds the IAM form scans `<form>.png` (sub-folders such as formsA-D are searched too), XML_DIR the
IAM `<form>.xml` files. SPLITS_DIR holds train.uttlist / validation.uttlist / test.uttlist, each either a list of
form ids (RWTH split: 747/116/336 forms) or of line ids such as `a01-000u-00` (official IAM line-level split),
detected by content. "validation" is written to the `val` split.

Every line is cropped from its form by the union of its component boxes (XML `<cmp>`) plus a margin, scaled by
--scale (0.5 by default, as upstream halves the forms) and written to OUT_DIR/<split>/<line id>.png, with
OUT_DIR/<split>/gt.txt holding `<line id> <transcription>` (XML entities decoded, NFC). With --lines-txt the
boxes and texts come from IAM's ascii/lines.txt instead (its `|` word separators become spaces, so punctuation
stays a separate token there) and XML_DIR is not read.

Lines marked segmentation="err" are kept (as RWTH does) unless --drop-seg-errors. Re-running skips forms whose
lines are all written and rebuilds gt.txt. Expected on the real database with the RWTH split and the defaults:
6482 train / 976 val / 2915 test lines.
"""
import argparse
from pathlib import Path

from htr.iam import prepare


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("forms_dir", type=Path, help="IAM form images <form>.png")
    p.add_argument("xml_dir", type=Path, help="IAM <form>.xml files (ignored with --lines-txt)")
    p.add_argument("splits_dir", type=Path, help="train/validation/test.uttlist (form ids or line ids)")
    p.add_argument("out_dir", type=Path)
    p.add_argument("--scale", type=float, default=0.5, help="resize factor of the form images")
    p.add_argument("--margin", type=int, default=8, help="pixels added around the box union, before scaling")
    p.add_argument("--drop-seg-errors", action="store_true", help='drop lines with segmentation="err"')
    p.add_argument("--lines-txt", type=Path, help="IAM ascii/lines.txt: boxes and texts instead of the XML")
    p.add_argument("--workers", type=int, default=2)
    return p.parse_args(argv)


def main(argv=None) -> None:
    prepare(parse_args(argv))


if __name__ == "__main__":
    main()

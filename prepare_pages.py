"""Cut the text lines of PAGE-XML / ALTO pages (Transkribus, eScriptorium exports) into the shared line-data format.

    python prepare_pages.py XML_DIR OUT_DIR [--images DIR] [--splits DIR] [--line-type T ...] [--scale 1.0]
        [--val-fraction 0.1] [--test-fraction 0.1] [--seed 0] [--workers N] [--licence ID]

XML_DIR is searched recursively for *.xml; each file is read as PAGE (2010-2019) or ALTO (v2-v4), detected per
file (see htr/pagexml.py). A page's image is the file its XML names (PAGE Page/@imageFilename, ALTO
sourceImageInformation/fileName), else one with the XML's own name and any of .jpg .jpeg .png .tif .tiff, else a
unique one whose name differs from these by a prefix or suffix (`imp_x.jpg` for `x.jpg`); it is looked for next to
the XML, then under --images DIR, by default under XML_DIR, or, if XML_DIR holds no images, under its parent and
the parent's sub-folders (alto/ + jpg/ side by side).

Each line is cut along its polygon: pixels outside the polygon, dilated by DILATE line spacings, are painted with
the paper grey of the line (90th percentile of the pixels inside), then the image is cropped to the polygon's box.
Coordinates are scaled from the XML's page size to the image's. The line spacing of a page is the median distance
between a baseline and the next one below; the typical line height, the 90th percentile of the polygons' heights.
A polygon that has fewer than 3 points, lies off the page, misses its own baseline (Transkribus exports with Coords
on another scale) or is a thin strip (under THIN line spacings and half the typical height, and elongated) is
replaced by a band from BAND_UP line spacings above the baseline to BAND_DOWN below it; without a usable baseline
the bounding box of whatever geometry the line has (polygon points, ALTO HPOS/VPOS/WIDTH/HEIGHT) is cut. Fallbacks
are counted by kind and reason, and recorded per line. Text: NFC, whitespace collapsed; empty lines are skipped
and counted. --line-type (repeatable) keeps lines whose own type or whose region's type is one of the given (PAGE
@type and custom `structure {type:...}`, ALTO TAGREFS -> Tags/@LABEL; see htr/pagexml.py).

Splits: with --splits DIR, DIR/{train,val,test}.txt list page ids (XML file name without .xml, one per line) and
pages in no list are ignored and counted; otherwise a seeded page-level split with the given fractions. Output, next
to whatever else OUT_DIR holds: OUT_DIR/<split>/<id>.png (grey, native resolution times --scale) and <split>/gt.txt
(`<id> <text>`, by page, then line), ids `<page>_<line number on the page>` where every character of the page name
other than letters, digits, `.` and `-` becomes `_` (numbered on a clash). OUT_DIR/pages/<page>.json records each
finished page (settings, image, lines with their XML ids and fallbacks): a re-run redoes only pages whose XML,
image, split or options changed, and rebuilds gt.txt from the current pages (line images of pages left out stay on
disk, unused). A summary (pages, lines and characters per split, charset, rare characters, fallbacks, skips with
reasons, the corpus's licence) is printed and written to OUT_DIR/summary.json. The licence is --licence, else the
first one named by htr-united.yml (HTR-United), a LICENSE / COPYING file or the README in XML_DIR or its parent, else
"unknown" (the summary says so); the trainer records it and exported model cards list it. Problems (malformed XML,
unknown dialect, no image, image size mismatch) are reported per file and never stop the run.
"""
import argparse
import os
from pathlib import Path

from htr.page_lines import prepare
from utils import run_main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("xml_dir", type=Path, help="folder searched recursively for PAGE / ALTO *.xml")
    p.add_argument("out_dir", type=Path, help="gets train/ val/ test/ pages/ summary.json")
    p.add_argument("--images", type=Path, help="folder searched recursively for the page images")
    p.add_argument("--splits", type=Path, help="folder with train.txt, val.txt, test.txt page-id lists")
    p.add_argument("--line-type", action="append", default=[],
                   help="keep only lines of this type or in a region of this type (repeatable)")
    p.add_argument("--scale", type=float, default=1.0, help="resize factor of the line images")
    p.add_argument("--val-fraction", type=float, default=0.1, help="of the pages, without --splits")
    p.add_argument("--test-fraction", type=float, default=0.1, help="of the pages, without --splits")
    p.add_argument("--seed", type=int, default=0, help="of the page split without --splits")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--licence", help="the corpus's licence (e.g. CC-BY-4.0), when its files do not say it")
    return p.parse_args(argv)


def main(argv=None) -> None:
    prepare(parse_args(argv))


if __name__ == "__main__":
    run_main(main)

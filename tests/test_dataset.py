"""Line dataset: validation and skip summary, preprocessing, cache, sharded splits."""
import logging
import shutil
import unicodedata

import cv2
import numpy as np
import pytest
import torch

import dataset
from conftest import ROOT, render_line, tiny_setup, write_split
from dataset import Collate, LineDataset
from htr.decoding import CharNgramLM
from htr.evaluation import build_lm
from htr.images import pad_center, preprocess
from utils import Charset, UserError, load_config


def test_bad_lines_are_skipped_counted_and_listed(tmp_path, caplog):
    d = write_split(tmp_path, "train", ["ab", "cd", "abc", "dab", "bad"])
    (d / "train-002.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")                     # corrupt PNG
    (d / "train-003.png").unlink()                                                       # missing image
    with open(d / "gt.txt", "a", encoding="utf-8") as f:
        f.write("no-space-line\n")
        f.write("train-005 \n")                                                          # empty transcription
    with caplog.at_level(logging.WARNING, logger="htr"):
        ds = LineDataset(tmp_path, "train", 32, 256, cache=False)
    assert ds.ids == ["train-000", "train-001", "train-004"]
    assert len(ds.skipped) == 4
    msg = caplog.text
    assert "skipped 4 line(s)" in msg
    assert "gt.txt:6: no space" in msg and "gt.txt:7: empty transcription" in msg
    assert "corrupt" in msg and "train-002.png" in msg and "not found" in msg


def test_nothing_valid_is_a_clear_error(tmp_path):
    d = write_split(tmp_path, "train", ["ab"])
    (d / "train-000.png").write_bytes(b"")
    with pytest.raises(UserError, match="no valid lines"):
        LineDataset(tmp_path, "train", 32, 256, cache=False)


def test_missing_split_and_gt_are_clear(tmp_path):
    with pytest.raises(UserError, match="split directory not found"):
        LineDataset(tmp_path, "val", 32, 256)
    (tmp_path / "val").mkdir()
    with pytest.raises(UserError, match="no ground truth file"):
        LineDataset(tmp_path, "val", 32, 256)


def test_text_is_nfc_normalized(tmp_path):
    d = write_split(tmp_path, "train", ["ab"])
    (d / "gt.txt").write_text("train-000 cafe\u0301 x\n", encoding="utf-8")
    ds = LineDataset(tmp_path, "train", 32, 256, cache=False)
    assert ds.texts == [unicodedata.normalize("NFC", "caf\u00e9 x")]


def test_preprocess_inverts_keeps_aspect_and_pads_centred():
    img = np.full((50, 400), 255, np.uint8)
    img[20:30, 100:300] = 0                                                             # dark ink stroke
    small = preprocess(img, 128, 1024)
    assert small.shape == (112, 896)                                                    # height-bound: 112/50*400
    assert small.max() == 255 and small[0, 0] == 0                                      # ink bright, paper dark
    full = pad_center(small, 128, 1024)
    assert full.shape == (128, 1024) and full[:8].max() == 0 and full[:, :64].max() == 0


def test_items_and_collate(tmp_path):
    write_split(tmp_path, "train", ["ab", "bad"])
    ds = LineDataset(tmp_path, "train", 32, 256, cache=False, augment=True)
    ds.set_epoch_seed(0)
    img, text, line_id = ds[1]
    assert img.shape == (1, 32, 256) and img.dtype == torch.float32 and 0 <= img.min() <= img.max() <= 1
    images, targets, lengths, texts, ids, audio = Collate(Charset("abd"))([ds[0], ds[1]])
    assert audio is None
    assert images.shape == (2, 1, 32, 256)
    assert targets.tolist() == [1, 2, 2, 1, 3] and lengths.tolist() == [2, 3]


def test_augmentation_depends_only_on_epoch_seed_and_line(tmp_path):
    write_split(tmp_path, "train", ["abcd", "abcd"])
    ds = LineDataset(tmp_path, "train", 32, 256, cache=False, augment=True)
    ds.set_epoch_seed(5)
    first = ds[0][0]
    assert not ds[1][0].equal(first)                        # same picture, another line: another augmentation
    assert ds[0][0].equal(first)                            # whatever was read in between (worker, order)
    ds.set_epoch_seed(6)
    assert not ds[0][0].equal(first)                        # another epoch


def test_cache_is_reused_and_invalidated_by_changes(tmp_path, monkeypatch):
    d = write_split(tmp_path, "train", ["ab", "cd"])
    (d / "gt.txt").write_text("train-000 ab\ntrain-001 cd\nbroken-line\n")
    first = LineDataset(tmp_path, "train", 32, 256)
    assert len(list(d.glob(".cache-*.npz"))) == 1

    def no_decoding(path):
        raise AssertionError("decoded although cached")

    monkeypatch.setattr(dataset, "read_image", no_decoding)
    second = LineDataset(tmp_path, "train", 32, 256)
    assert all(np.array_equal(a, b) for a, b in zip(first.images, second.images))
    assert second.texts == first.texts and len(second.skipped) == 1
    monkeypatch.undo()
    cv2.imwrite(str(d / "train-001.png"), render_line("dd"))                           # changed file: re-decode
    import os
    os.utime(d / "train-001.png", ns=(1, 1))
    third = LineDataset(tmp_path, "train", 32, 256)
    assert not np.array_equal(third.images[1], first.images[1])


def write_shards(root, split: str, shards: list) -> list:
    """<root>/<split>/shard-0000k/ per list of texts, ids unique across shards (<split>-<k><i>)."""
    folders = []
    for k, texts in enumerate(shards):
        d = write_split(root / split, f"shard-{k:05d}", texts)
        for i in range(len(texts)):                                                    # ids unique across shards
            (d / f"shard-{k:05d}-{i:03d}.png").rename(d / f"{split}-{k}{i:02d}.png")
        gt = d / "gt.txt"
        gt.write_text("".join(f"{split}-{k}{i:02d} {t}\n" for i, t in enumerate(texts)), encoding="utf-8")
        folders.append(d)
    return folders


def test_a_sharded_split_is_the_union_of_its_complete_shards(tmp_path, caplog):
    a, b, c, d = write_shards(tmp_path, "train", [["ab", "cd"], ["abc", "dab", "bad"], ["cab"], ["dd"]])
    (b / "train-101.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")                   # corrupt PNG
    (c / "gt.txt").unlink()                                                              # incomplete shard
    with open(d / "gt.txt", "a", encoding="utf-8") as f:
        f.write("train-000 ab\n")                                                        # an id of shard 0
    shutil.copy(a / "train-000.png", d)
    with caplog.at_level(logging.WARNING, logger="htr"):
        ds = LineDataset(tmp_path, "train", 32, 256, cache=False)
    assert ds.ids == ["train-000", "train-001", "train-100", "train-102", "train-300"]
    assert ds.texts == ["ab", "cd", "abc", "bad", "dd"] and len(ds[4][0]) == 1
    assert caplog.text.count("incomplete shard") == 1 and "shard-00002" in caplog.text
    assert f"{b / 'gt.txt'} id train-101: " in caplog.text and "train-101.png" in caplog.text
    assert f"{d / 'gt.txt'} id train-000: duplicate id, already in an earlier shard" in caplog.text


def test_no_complete_shard_is_a_clear_error(tmp_path):
    (a,) = write_shards(tmp_path, "val", [["ab"]])
    (a / "gt.txt").unlink()
    with pytest.raises(UserError, match=r"no ground truth file .*val/gt.txt .*and no complete shard"):
        LineDataset(tmp_path, "val", 32, 256)


def test_shards_are_cached_each_in_its_folder_and_memory_mapped(tmp_path, monkeypatch):
    folders = write_shards(tmp_path, "train", [["ab", "cd"], ["abc", "dab"]])
    decoded = LineDataset(tmp_path, "train", 32, 256, cache=False)
    first = LineDataset(tmp_path, "train", 32, 256)
    assert not list((tmp_path / "train").glob(".cache-*"))
    assert all(len(list(d.glob(".cache-*.npz"))) == 1 == len(list(d.glob(".cache-*.pixels.npy"))) for d in folders)
    monkeypatch.setattr(dataset, "read_image", lambda path: pytest.fail(f"decoded {path} although cached"))
    second = LineDataset(tmp_path, "train", 32, 256)
    for images in (first.images, second.images):
        assert all(np.array_equal(a, b) for a, b in zip(decoded.images, images)) and len(images) == 4
        assert all(isinstance(img, np.memmap) for img in images)                         # read on demand
    assert second.ids == decoded.ids and second[3][1] == "dab"


def test_sharded_splits_train_with_the_union_charset(tmp_path, caplog):
    from htr import training
    root, overrides = tiny_setup(tmp_path)
    for split in ("train", "val"):
        shutil.rmtree(root / split)
    write_shards(root, "train", [["ab", "ba", "cab"], ["bad", "add", "dab", "cd", "dc"]])
    write_shards(root, "val", [["abc"], ["bce"]])                                       # e: never in train
    with caplog.at_level(logging.WARNING, logger="htr"):
        t = training.Trainer(load_config(ROOT / "config.yaml", overrides))
    assert t.charset.chars == "abcd" and len(t.train_set) == 8 and len(t.val_set) == 2
    assert "1 character(s) of the val split never occur in training and count as errors: 'e'" in caplog.text


def test_train_fraction_keeps_whole_pages_drawn_by_seed(tmp_path, caplog, monkeypatch):
    """data.train_fraction: the lines of round(fraction x pages) pages (ids <page>_<NNN> as prepare_pages.py writes
    them), the same pages for the same seed, every line of a chosen page, and (0, 1] checked; decode.build_lm
    estimates the character LM from those pages' lines only."""
    d = write_split(tmp_path, "train", ["ab", "cd", "abc", "dab", "bad", "cab", "dd", "ba"])
    gt = [line.split(" ", 1) for line in (d / "gt.txt").read_text().splitlines()]
    renamed = []
    for k, (old, text) in enumerate(gt):                               # 4 pages of 2 lines: p0_000, p0_001, p1_000 ...
        new = f"p{k // 2}_{k % 2:03d}"
        (d / f"{old}.png").rename(d / f"{new}.png")
        renamed.append(f"{new} {text}")
    (d / "gt.txt").write_text("\n".join(renamed) + "\n")

    def kept(fraction, seed):
        ds = LineDataset(tmp_path, "train", 32, 256, cache=False)
        ds.keep_pages(fraction, seed)
        assert [ds[k][1] for k in range(len(ds))] == ds.texts            # images follow their ids
        return ds.ids

    with caplog.at_level(logging.INFO, logger="htr"):
        half = kept(0.5, seed=1)
    assert "data.train_fraction=0.5 keeps 2 of 4 pages, 4 lines" in caplog.text
    assert sorted({dataset.page_of(i) for i in half}) != ["p0", "p1", "p2", "p3"] and len(half) == 4
    assert all(f"{dataset.page_of(i)}_{n:03d}" in half for i in half for n in (0, 1))  # whole pages
    assert kept(0.5, seed=1) == half and len(kept(0.1, seed=1)) == 2 and len(kept(1.0, seed=1)) == 8
    assert {tuple(kept(0.5, seed)) for seed in range(6)} != {tuple(half)}                # the seed draws them
    assert dataset.page_of("a01-000u-00") == "a01-000u" and dataset.page_of("JDH_2_16_96_003_009") == "JDH_2_16_96_003"
    with pytest.raises(UserError, match=r"data.train_fraction must be in \(0, 1\], got 0"):
        kept(0, seed=1)


    fitted = []                                   # the beam search's character LM reads the same pages' text
    monkeypatch.setattr(CharNgramLM, "fit", lambda self, lines, text_file=None: fitted.extend(lines) or 0)
    cfg = load_config(ROOT / "config.yaml", [f"data.path={tmp_path}", "data.train_fraction=0.5", "seed=1"])
    build_lm(cfg, Charset.from_texts(["abcd"]), tmp_path / "lm.json.gz")
    assert sorted(fitted) == sorted(text for line_id, text in map(str.split, renamed) if line_id in half)

"""Data loading under real conditions: forked workers after OpenCV use, the shipped config with its default worker
count on a cold cache, batch sampling, stalled workers, labels that cannot fit CTC, corrupt caches."""
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

import dataset
from htr import training
from conftest import ROOT, WORDS, tiny_setup, write_split
from dataset import EpochBatchSampler, LineDataset, line_loader, worker_count
from utils import Charset, UserError, load_config


def run_python(code: str, timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout)


def test_workers_forked_after_opencv_ran_in_a_thread_do_not_hang(tiny_data):
    """The mechanism of the paper config's hang: OpenCV used from a thread in the parent (the cache build), then
    forked loader workers touching OpenCV's thread pool. Every worker must deliver its batches."""
    code = f"""
        import threading, numpy as np, torch
        import dataset
        from utils import Charset
        img = np.full((60, 500), 200, np.uint8)
        t = threading.Thread(target=dataset.preprocess, args=(img, 128, 1024))      # as cache builds do
        t.start(); t.join()
        ds = dataset.LineDataset({str(tiny_data)!r}, "train", 128, 1024, cache=False, augment=True)
        loader = dataset.line_loader(ds, Charset("abcd"), batch_size=2, workers=2, timeout=30)
        print(sum(len(batch[3]) for batch in loader), "lines")
    """
    proc = run_python(code, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "8 lines"


def test_shipped_config_trains_with_its_default_workers_on_a_cold_cache(tmp_path):
    """config.yaml as users run it (train.num_workers: 8, eval 8, cache on, cold): only tiny sizes overridden."""
    root, overrides = tiny_setup(tmp_path)
    kept = [o for o in overrides if not o.startswith(("train.num_workers", "eval.num_workers"))]
    proc = subprocess.run([sys.executable, "trainer.py", "config.yaml", *kept, "train.num_epochs=2",
                           "train.augment=true"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list((root / "train").glob(".cache-*.npz"))                 # the cache was built by this run
    if os.cpu_count() < 8:
        assert "train.num_workers=8, but this process may use" in proc.stderr
    assert (tmp_path / "runs" / "tiny" / "best.pt").is_file()


def test_worker_count_is_clamped_to_usable_cpus(monkeypatch, caplog):
    monkeypatch.setattr(dataset, "usable_cpus", lambda: 3)
    with caplog.at_level("INFO", logger="htr"):
        assert worker_count(8, "train.num_workers") == 3
    assert "train.num_workers=8, but this process may use 3 CPU(s)" in caplog.text
    assert worker_count(2, "train.num_workers") == 2
    assert worker_count(8, "train.num_workers", processes=2) == 1


def test_epoch_batches_are_seeded_sharded_and_resumable():
    sampler = EpochBatchSampler(10, 3, seed=1)                          # 4 batches: 3 + 3 + 3 + 1 lines
    epoch0 = list(sampler)
    assert sorted(i for b in epoch0 for i in b) == list(range(10)) and sampler.steps_per_epoch == 4
    assert list(EpochBatchSampler(10, 3, seed=1)) == epoch0             # same seed, same order
    sampler.set_epoch(1)
    assert list(sampler) != epoch0                                      # another epoch, another order
    sampler.set_epoch(0, start_step=2)
    assert list(sampler) == epoch0[2:] and len(sampler) == 2            # mid-epoch resume: the rest, in order
    shards = [EpochBatchSampler(10, 3, seed=1, num_replicas=2, rank=r) for r in (0, 1)]
    assert [s.steps_per_epoch for s in shards] == [2, 2]                # the schedule counts these steps
    assert [list(s) for s in shards] == [[epoch0[0], epoch0[2]], [epoch0[1], epoch0[3]]]
    three = [list(EpochBatchSampler(10, 3, seed=1, num_replicas=3, rank=r)) for r in range(3)]
    assert [len(s) for s in three] == [2, 2, 2] and three[1][1] == epoch0[0]   # wraps: equal steps everywhere


def test_a_stalled_worker_is_an_error_naming_its_lines(tiny_overrides, monkeypatch):
    get_item = LineDataset.__getitem__

    def stall_in_worker(self, i):
        if torch.utils.data.get_worker_info() is not None and self.ids[i] == "train-003":
            time.sleep(60)
        return get_item(self, i)

    monkeypatch.setattr(LineDataset, "__getitem__", stall_in_worker)
    cfg = load_config(ROOT / "config.yaml", tiny_overrides + ["train.num_workers=1", "data.loader_timeout=3",
                                                              "train.batch_size=8"])
    t = training.Trainer(cfg)
    with pytest.raises(UserError, match=r"no batch from the data loader workers in 3 s \(epoch 1, step 1, "
                                        r"lines .*train-003"):
        t.fit()


def test_labels_that_cannot_fit_the_frames_are_skipped_and_named(tmp_path, caplog):
    write_split(tmp_path, "train", ["ab", "abcd", "aab", "abc"])
    with caplog.at_level("WARNING", logger="htr"):
        ds = LineDataset(tmp_path, "train", 32, 256, cache=False, max_frames=3)
    assert ds.texts == ["ab", "abc"]                                    # "aab" needs a blank between the a's: 4
    assert "id train-001" in caplog.text and "label needs 4 CTC frames" in caplog.text
    assert "id train-002" in caplog.text


def test_the_trainer_skips_lines_longer_than_its_frames(tmp_path, caplog):
    root, overrides = tiny_setup(tmp_path)
    write_split(root, "train", WORDS[:7] + ["ab" * 20])                 # 40 characters, 32 frames at width 256
    with caplog.at_level("WARNING", logger="htr"):
        t = training.Trainer(load_config(ROOT / "config.yaml", overrides))
    assert len(t.train_set) == 7 and "train-007" in caplog.text and "outputs 32" in caplog.text


@pytest.mark.parametrize("garbage", [b"", b"PK\x03\x04 truncated zip", b"\x93NUMPY not really"])
def test_a_corrupt_cache_is_rebuilt_with_a_warning(tmp_path, caplog, garbage):
    write_split(tmp_path, "train", ["ab", "cd"])
    first = LineDataset(tmp_path, "train", 32, 256)
    (cache,) = (tmp_path / "train").glob(".cache-*.npz")
    cache.write_bytes(garbage)
    with caplog.at_level("WARNING", logger="htr"):
        second = LineDataset(tmp_path, "train", 32, 256)
    assert "is unreadable" in caplog.text and "rebuilding it" in caplog.text
    assert all(np.array_equal(a, b) for a, b in zip(first.images, second.images))
    assert cache.stat().st_size > 100                                   # rewritten


def test_loader_keeps_the_global_rng_untouched(tiny_data):
    ds = LineDataset(tiny_data, "train", 32, 256, cache=False)
    state = torch.get_rng_state()
    list(line_loader(ds, Charset("abcd"), batch_size=4))
    assert torch.equal(torch.get_rng_state(), state)


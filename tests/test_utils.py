"""Config, charset, decoding, metrics and checkpoint helpers."""
import pytest
import torch

from conftest import ROOT
import utils
from htr.metrics import error_rates
from utils import (Charset, UserError, atomic_write, autocast_dtype, load_config, mixed_precision, resolve_device,
                   split_cli, train_memory_format)

CONFIG = ROOT / "config.yaml"


def test_overrides_apply_and_typos_name_close_keys():
    cfg = load_config(CONFIG, ["train.lr=0.01", "train.use_llm=false"])
    assert cfg.train.lr == 0.01 and cfg.train.use_llm is False
    with pytest.raises(UserError, match=r"unknown config key 'train.lrr'.*did you mean train.lr"):
        load_config(CONFIG, ["train.lrr=0.1"])
    with pytest.raises(UserError, match="expected key=value"):
        load_config(CONFIG, ["train.lr"])


def test_typo_inside_a_derived_yaml_is_reported_with_the_file(tmp_path):
    quick = tmp_path / "quick.yaml"
    quick.write_text(f"base: {CONFIG}\ntrain:\n  num_epoch: 3\n")
    with pytest.raises(UserError, match=r"'train.num_epoch' in .*quick.yaml; did you mean train.num_epochs"):
        load_config(quick)


def test_quick_config_derives_from_the_paper_config():
    quick = load_config(ROOT / "config_quick.yaml")
    assert quick.train.use_llm is False
    assert quick.arch.head_type == "both" and "mobilevit1" in quick.arch.cnn_cfg


def test_real_config_has_the_quick_start_models_shape():
    """config_real.yaml's runs start from the quick-start model (train.init_from): same arch and line size."""
    quick, real = load_config(ROOT / "config_quick.yaml"), load_config(ROOT / "config_real.yaml")
    assert real.arch == quick.arch and real.preproc == quick.preproc
    assert real.data.path == "./data/hooker/lines" and real.train.use_llm is False


def test_missing_config_file_is_clear(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "none.yaml")


def test_split_cli():
    assert split_cli(["c.yaml", "a=1", "x.png", "b.c=2"]) == ("c.yaml", ["a=1", "b.c=2"], ["x.png"])
    with pytest.raises(UserError, match="usage"):
        split_cli(["a=1"])


def test_cuda_without_cuda_is_clear():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(UserError, match="device=cuda but CUDA is not available"):
        resolve_device("cuda")
    assert resolve_device("auto").type == "cpu"


def test_train_memory_format_auto_is_nchw_only_on_cpus_without_avx512(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert train_memory_format("auto", cpu) == torch.contiguous_format
    assert train_memory_format("auto", cuda) == torch.channels_last
    assert train_memory_format(True, cpu) == torch.channels_last
    assert train_memory_format(False, cuda) == torch.contiguous_format
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert train_memory_format("auto", cpu) == torch.channels_last
    with pytest.raises(UserError, match="train.channels_last must be true, false or auto, got 'yes'"):
        train_memory_format("yes", cpu)


@pytest.mark.parametrize("amx, avx512_bf16, expected", [(False, False, "no"), (True, False, "bf16"),
                                                        (False, True, "bf16")])
def test_mixed_precision_auto_is_bf16_on_cpus_with_native_bf16(monkeypatch, amx, avx512_bf16, expected):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    cpu = torch.device("cpu")
    assert mixed_precision("auto", cpu, "train.mixed_precision") == expected
    assert autocast_dtype("auto", cpu) == (torch.bfloat16 if expected == "bf16" else None)


def test_mixed_precision_settings():
    cpu = torch.device("cpu")
    assert mixed_precision(False, cpu, "eval.mixed_precision") == "no"       # `no` on the command line is YAML false
    assert autocast_dtype("no", cpu) is None and autocast_dtype("fp16", cpu) == torch.float16
    with pytest.raises(UserError, match="eval.mixed_precision must be auto, no, bf16 or fp16, got 'fp8'"):
        autocast_dtype("fp8", cpu)


def test_charset_round_trip_and_unknown_chars():
    cs = Charset.from_texts(["ba a", "ca"])
    assert cs.chars == " abc" and len(cs) == 5
    assert cs.encode("cab") == [4, 2, 3]
    assert cs.decode([4, 0, 2]) == "ca"
    assert cs.unknown("abz!") == {"z", "!"}
    assert cs.encode("az") == [2]


def test_error_rates_match_hand_computed_values():
    refs = ["hello world", "abc"]
    hyps = ["helo world", "abd"]
    m = error_rates(refs, hyps, "space")
    assert m["char_errors"] == 2 and m["chars"] == 14
    assert m["cer"] == pytest.approx(2 / 14)
    assert m["word_errors"] == 2 and m["words"] == 3
    assert m["wer"] == pytest.approx(2 / 3)


def test_wer_tokenizer_mode_splits_punctuation():
    m_tok = error_rates(["Hello, world."], ["Hello world."], "tokenizer")
    m_space = error_rates(["Hello, world."], ["Hello world."], "space")
    assert m_tok["words"] == 4 and m_tok["word_errors"] == 1   # Hello , world .
    assert m_space["words"] == 2 and m_space["word_errors"] == 1
    with pytest.raises(UserError, match="wer_mode"):
        error_rates(["a"], ["a"], "chars")


def test_atomic_write_keeps_the_old_file_and_no_temp_on_any_error(tmp_path):
    path = tmp_path / "metrics.csv"
    with atomic_write(path, "w") as f:
        f.write("epoch\n1\n")
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(path, "w") as f:
            f.write("epoch\n1\n2")
            raise KeyboardInterrupt                                  # Ctrl-C half-way through a write
    assert path.read_text() == "epoch\n1\n" and [p.name for p in tmp_path.iterdir()] == ["metrics.csv"]


@pytest.mark.parametrize("files, quota", [({"cpu.max": "150000 100000\n"}, 1.5), ({"cpu.max": "max 100000\n"}, None),
                                          ({"cpu/cpu.cfs_quota_us": "50000\n", "cpu/cpu.cfs_period_us": "100000\n"},
                                           0.5),
                                          ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
                                          ({}, None)])
def test_cpu_quota_reads_cgroup_v2_and_v1(tmp_path, files, quota):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert utils.cpu_quota(tmp_path) == quota


@pytest.mark.parametrize("affinity, quota, usable", [(4, None, 4), (4, 1.5, 2), (4, 0.5, 1), (2, 8.0, 2)])
def test_usable_cpus_is_the_affinity_mask_capped_by_the_quota(monkeypatch, affinity, quota, usable):
    monkeypatch.setattr(utils.os, "sched_getaffinity", lambda pid: set(range(affinity)))
    monkeypatch.setattr(utils, "cpu_quota", lambda: quota)
    assert utils.usable_cpus() == usable


@pytest.mark.parametrize("requested, workers, processes, threads", [(0, 1, 1, 3), (0, 0, 1, 4), (0, 6, 1, 1),
                                                                    (0, 1, 2, 1), (2, 1, 1, 2)])
def test_torch_threads_leave_the_workers_their_cpus(monkeypatch, caplog, requested, workers, processes, threads):
    """On 4 usable CPUs: the loader workers' CPUs are not the model's (a busy core must not stall a parallel
    region); at least one thread; an explicit train.num_threads wins. Logged with the key that overrides it."""
    monkeypatch.setattr(utils, "usable_cpus", lambda: 4)
    before = torch.get_num_threads()
    try:
        with caplog.at_level("INFO", logger="htr"):
            assert utils.set_torch_threads(requested, workers, "train.num_threads", processes) == threads
        assert torch.get_num_threads() == threads
        assert f"{threads} PyTorch thread(s) beside {workers} loader worker(s)" in caplog.text
        assert f"(train.num_threads={requested}" in caplog.text
    finally:
        torch.set_num_threads(before)

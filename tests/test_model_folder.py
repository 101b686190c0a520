"""Model folders (export.py export.format=folder): identical outputs, no pickle, charset format, clear errors, Hub ids
from the cache and offline, the model card, and the CLI round trip export -> demo.py resume=FOLDER."""
import json
import logging
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard, constants
from omegaconf import OmegaConf

import conftest
from htr import evaluation
import export
from conftest import ROOT
from htr.inference import line_log_probs, load_model
from htr.model_folder import CHARSET, CONFIG, LM, WEIGHTS, read_charset, write_charset
from htr.training import Trainer
from utils import UserError, load_checkpoint, load_config

CONFIG_YAML = ROOT / "config.yaml"
TEXTS = ["ab cd", "ba dc", "cab", "bad add", "dab", "cd ab", "dc", "abc d"]   # a charset with a space
STOCK = ["device=cpu", "eval.num_workers=0"]                                   # the stock config, no TINY arch


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny model trained one epoch, evaluated (greedy + beam with a built LM), exported to a folder by
    export.main: (overrides, checkpoint, folder, data root)."""
    tmp = tmp_path_factory.mktemp("folder")
    root = tmp / "lines"
    for split, texts in (("train", TEXTS), ("val", TEXTS[:3]), ("test", TEXTS[3:6])):
        conftest.write_split(root, split, texts)
    licence = {"licence": "CC-BY-4.0", "found_in": "/corpus/README.md"}        # as prepare_pages.py records it
    (root / "summary.json").write_text(json.dumps({"licence": licence}))
    overrides = conftest.TINY + [f"data.path={root}", f"model.save_dir={tmp / 'runs'}", "model.run_name=folder",
                                 "train.num_epochs=1"]
    Trainer(load_config(CONFIG_YAML, overrides)).fit()
    best = tmp / "runs" / "folder" / "best.pt"
    overrides.append(f"resume={best}")
    evaluation.evaluate(load_config(CONFIG_YAML, overrides + ["decode.mode=beam", "decode.build_lm=true"]), best)
    folder = tmp / "model"
    export.main([str(CONFIG_YAML), *overrides, "export.format=folder", "export.license=mit", str(folder)])
    return overrides, best, folder, root


def log_probs(cfg, resume, images=None):
    model, charset, _ = load_model(cfg, resume)
    images = torch.rand(3, 1, cfg.preproc.image_height, cfg.preproc.image_width,
                        generator=torch.Generator().manual_seed(0)) if images is None else images
    return line_log_probs(model, images), charset


def test_folder_gives_the_checkpoints_log_probs_with_the_stock_config(run):
    overrides, best, folder, _ = run
    ref, ref_charset = log_probs(load_config(CONFIG_YAML, overrides), best)
    stock = load_config(CONFIG_YAML, STOCK)                                # 128x1024 and the paper architecture
    ours, charset = log_probs(stock, folder)
    assert (stock.preproc.image_height, stock.preproc.image_width) == (32, 256)   # the folder's, adopted
    assert stock.arch.rnn_hidden_size == 32 and stock.decode.lm_path == str(folder / LM)
    assert charset.chars == ref_charset.chars and " " in charset.chars
    assert all(np.array_equal(a, b) for a, b in zip(ours, ref))


def test_folder_holds_safetensors_and_plain_files_only(run):
    from safetensors.torch import load_file
    _, best, folder, _ = run
    ckpt = load_checkpoint(best)
    assert sorted(p.name for p in folder.iterdir()) == sorted([WEIGHTS, CONFIG, CHARSET, LM, "README.md"])
    weights = load_file(str(folder / WEIGHTS))
    assert weights.keys() == ckpt["model"].keys() and any(k.endswith("running_var") for k in weights)  # BN unfolded
    assert all(torch.equal(weights[k], v) for k, v in ckpt["model"].items())
    for path in folder.iterdir():
        assert path.read_bytes()[:2] not in (b"\x80\x02", b"\x80\x04", b"PK")  # no pickle, no torch zip
    assert (folder / CHARSET).read_bytes() == ckpt["charset"].encode("utf-8")
    config = load_config(folder / CONFIG)
    assert config.arch.rnn_hidden_size == 32 and config.decode.lm_path is None and "data" not in config


def test_charset_file_round_trips_exactly(tmp_path):
    chars = " !\"'(),-.:;?ABab\t\u00e9\u00df\u017f"
    write_charset(tmp_path / CHARSET, chars)
    assert read_charset(tmp_path / CHARSET) == chars
    (tmp_path / CHARSET).write_bytes((chars + "\r\n").encode())              # an editor's final newline
    assert read_charset(tmp_path / CHARSET) == chars
    with pytest.raises(UserError, match="newline"):
        write_charset(tmp_path / CHARSET, "ab\n")


def test_charset_that_does_not_fit_the_weights_is_one_error_naming_it(run, tmp_path):
    _, _, folder, _ = run
    bad = shutil.copytree(folder, tmp_path / "bad")
    write_charset(bad / CHARSET, read_charset(bad / CHARSET)[:-1])
    with pytest.raises(UserError, match=f"{bad / CHARSET} has .* characters but .*{WEIGHTS} has .* output classes"):
        load_model(load_config(CONFIG_YAML, STOCK), bad)
    (bad / CONFIG).unlink()
    with pytest.raises(UserError, match=f"{bad} is not a model folder: it lacks {CONFIG}"):
        load_model(load_config(CONFIG_YAML, STOCK), bad)


def fake_hub_cache(folder, cache, repo_id: str):
    """The layout huggingface_hub's cache gives a downloaded repo: refs/main -> snapshots/<commit>/files."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def test_hub_id_loads_from_the_cache_offline(run, tmp_path, monkeypatch):
    overrides, best, folder, _ = run
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    fake_hub_cache(folder, tmp_path, "htr-test/tiny")
    ours, _ = log_probs(load_config(CONFIG_YAML, STOCK), "htr-test/tiny")
    ref, _ = log_probs(load_config(CONFIG_YAML, overrides), best)
    assert all(np.array_equal(a, b) for a, b in zip(ours, ref))
    from htr.evaluation import evaluate
    monkeypatch.chdir(tmp_path)                                          # reports of a Hub model: ./owner--name/
    data = [o for o in overrides if o.startswith("data.path=")]
    report = evaluate(load_config(CONFIG_YAML, STOCK + data), "htr-test/tiny")
    assert (tmp_path / "htr-test--tiny" / f"eval_{report['data_name']}_test.json").is_file()


@pytest.mark.parametrize("offline", [True, False])
def test_hub_id_that_cannot_be_fetched_is_a_fast_clear_error(tmp_path, monkeypatch, offline):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)             # online: no network here, or no such repo
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    start = time.monotonic()
    with pytest.raises(UserError, match="resume=htr-test/no-such-model is no local file or folder") as e:
        load_model(load_config(CONFIG_YAML, STOCK), "htr-test/no-such-model")
    message = str(e.value)
    assert time.monotonic() - start < 8 and "\n" not in message
    assert not offline or "HF_HUB_OFFLINE is set" in message and "resume=DIR" in message


def test_hub_id_offline_from_the_command_line_is_one_line(run, tmp_path):
    _, _, _, root = run
    env = {**subprocess.os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, str(ROOT / "demo.py"), str(CONFIG_YAML), "device=cpu",
                           "resume=htr-test/no-such-model", str(root / "test" / "test-000.png")],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("error: resume=htr-test/no-such-model") and "hf download" in proc.stderr


def test_model_card_has_front_matter_metrics_and_usage(run):
    _, best, folder, _ = run
    card = ModelCard.load(folder / "README.md")
    assert card.data.license == "mit" and "handwritten-text-recognition" in card.data.tags
    assert card.data.pipeline_tag == "image-to-text"
    report = json.loads(next(best.parent.glob("eval_*.json")).read_text())
    for mode in ("greedy", "beam"):
        assert f"| {mode} | {100 * report[mode]['cer']:.2f} % | {100 * report[mode]['wer']:.2f} % |" in card.text
    info = json.loads((best.parent / "run_info.json").read_text())
    assert f"total {info['parameters']['total']:,}" in card.text and "validation (the last stage): 3 lines" in card.text
    assert "resume=FOLDER" in card.text and "hf upload" in card.text
    root = best.parents[2] / "lines"
    assert (f"| 1 | `folder` | `{root}` | 8 | `CC-BY-4.0` (from `/corpus/README.md`) |"
            in card.text)


def test_fine_tuning_from_a_folder_takes_its_architecture_and_records_every_stage(run, tmp_path, caplog):
    """train.init_from=FOLDER with the stock config (the paper architecture at 128x1024): the run takes the
    folder's arch and preproc and its weights, trains on new lines (a new character, another licence), and its
    checkpoint, run_info.json and the card of its own export list both stages with their licences."""
    overrides, best, folder, _ = run
    root = tmp_path / "mine"
    for split, texts in (("train", ["abe", "bad e", "cab"]), ("val", ["ea"])):
        conftest.write_split(root, split, texts)
    (root / "summary.json").write_text(json.dumps({"licence": {"licence": "CC0-1.0", "found_in": "/mine/LICENSE"}}))
    mine = STOCK + ["train.use_llm=false", "train.num_workers=0", "train.batch_size=2", "train.num_epochs=1",
                    f"data.path={root}", f"model.save_dir={tmp_path / 'runs'}", "model.run_name=mine",
                    f"train.init_from={folder}"]
    with caplog.at_level(logging.INFO, logger="htr"):
        trainer = Trainer(load_config(CONFIG_YAML, mine))
    base = load_config(CONFIG_YAML, overrides)
    assert trainer.cfg.arch == base.arch and trainer.cfg.preproc == base.preproc
    assert f"model folder {folder} brings its own settings: " in caplog.text and "preproc.image_height=32" in caplog.text
    state, weights = trainer.model.state_dict(), load_checkpoint(best)["model"]
    assert all(torch.equal(state[k], v) for k, v in weights.items() if k.startswith("backbone."))
    assert trainer.charset.chars == load_checkpoint(best)["charset"] + "e"             # init_resize=union
    trainer.fit()
    run_dir = tmp_path / "runs" / "mine"
    stages = load_checkpoint(run_dir / "last.pt")["training_data"]
    assert [(st["run"], st["train_lines"], st["licence"]["licence"]) for st in stages] == [
        ("folder", 8, "CC-BY-4.0"), ("mine", 3, "CC0-1.0")]
    assert json.loads((run_dir / "run_info.json").read_text())["training_data"] == stages
    assert OmegaConf.load(run_dir / "config.yaml").preproc.image_height == 32
    export.main([str(run_dir / "config.yaml"), f"resume={run_dir / 'best.pt'}", "export.format=folder",
                 str(tmp_path / "mine_model")])                           # a .pt goes with its run's config
    card = (tmp_path / "mine_model" / "README.md").read_text()
    assert "| 1 | `folder` |" in card and f"| 2 | `mine` | `{root}` | 3 | `CC0-1.0`" in card
    assert "Each stage started from the model of the stage before" in card


def test_fine_tuning_from_a_hub_id_that_cannot_be_fetched_names_the_key(tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    root = tmp_path / "mine"
    conftest.write_split(root, "train", ["ab", "ba"])
    cfg = load_config(CONFIG_YAML, STOCK + [f"data.path={root}", "train.init_from=htr-test/no-such-model"])
    with pytest.raises(UserError, match=r"train.init_from=htr-test/no-such-model is no local file or folder.*"
                                        r"pass train.init_from=DIR"):
        Trainer(cfg)


def test_evaluate_takes_a_folder_and_its_lm(run):
    _, best, folder, root = run
    report = evaluation.evaluate(load_config(CONFIG_YAML, STOCK + [f"data.path={root}", "decode.mode=beam"]), folder)
    ref = json.loads(next(best.parent.glob("eval_*.json")).read_text())
    assert report["greedy"] == ref["greedy"] and report["beam_settings"]["lm"] == str(folder / LM)


def test_export_options_are_checked(run, tmp_path):
    overrides, _, folder, _ = run
    with pytest.raises(UserError, match="export.format must be onnx or folder"):
        export.main([str(CONFIG_YAML), *overrides, "export.format=zip"])
    with pytest.raises(UserError, match="takes a training checkpoint"):
        export.main([str(CONFIG_YAML), *overrides, "export.format=folder", f"resume={folder}", str(tmp_path)])


def test_cli_export_then_demo_with_the_folder(run, tmp_path):
    overrides, _, _, root = run
    image = str(root / "test" / "test-000.png")

    def cli(script, *args):
        proc = subprocess.run([sys.executable, str(ROOT / script), str(CONFIG_YAML), *args], capture_output=True,
                              text=True, cwd=ROOT, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    out = tmp_path / "exported"
    assert cli("export.py", *overrides, "export.format=folder", str(out)).startswith(f"{out}: model folder (")
    assert cli("demo.py", "device=cpu", f"resume={out}", image) == cli("demo.py", *overrides, image)

"""The audio branch (arch.audio): the fused model, modality dropout, checkpoints of the image-only model, training
and evaluation on a tiny set with synthesised readings, and audio that cannot be used."""
import logging

import numpy as np
import pytest
import soundfile
import torch
from conftest import ROOT, tiny_setup

from dataset import AudioBatch, Collate
from htr import training
from htr.audio import SpokenLines, open_split
from htr.audio_model import AudioEncoder, mix_names, modality_dropout, modality_masks
from htr.evaluation import evaluate
from htr.speech_writer import write_speech
from models import AUDIO_MODULES, HTRNet
from utils import Charset, UserError, check_compatible, load_checkpoint, load_config, to_plain

CONFIG = ROOT / "config.yaml"
AUDIO = ["arch.audio.enabled=true", "arch.audio.channels=8", "arch.audio.hidden=16", "arch.audio.layers=1",
         "arch.audio.heads=2", "arch.audio.dropout=0"]


@pytest.fixture(scope="module")
def spoken(tmp_path_factory):
    """The tiny line set with an espeak-ng reading of every line, and the overrides of a tiny audio model."""
    root, overrides = tiny_setup(tmp_path_factory.mktemp("spoken"))
    write_speech(root, ["train", "val", "test"], ["en", "en-us+f3"], ["clean"], 0.0, workers=1, seed=0)
    return root, overrides + AUDIO


def tiny_model(overrides, n_classes=5):
    torch.manual_seed(0)
    return HTRNet(load_config(CONFIG, overrides).arch, n_classes).eval()


def readings(seconds=(1.0, 0.6), rate=16000):
    rng = np.random.default_rng(0)
    return AudioBatch.of([rng.normal(0, 0.1, int(s * rate)).astype(np.float32) for s in seconds])


def test_audio_off_is_the_image_only_model_and_its_checkpoints_still_load(tiny_overrides):
    """No audio weights without arch.audio.enabled; a checkpoint from before the audio branch (no arch.audio)
    matches a config with it off, but not one with it on."""
    off, on = tiny_model(tiny_overrides), tiny_model(tiny_overrides + AUDIO)
    assert not any(k.startswith(AUDIO_MODULES) for k in off.state_dict())
    assert {k for k in on.state_dict() if not k.startswith(AUDIO_MODULES)} == set(off.state_dict())
    cfg = load_config(CONFIG, tiny_overrides)
    old_arch = {k: v for k, v in to_plain(cfg.arch).items() if k != "audio"}
    old = {"arch": old_arch, "preproc": to_plain(cfg.preproc), "charset": "abcd"}
    check_compatible(old, cfg, "old.pt")
    check_compatible(old, load_config(CONFIG, tiny_overrides + ["arch.audio.channels=4"]), "old.pt")
    with pytest.raises(UserError, match="arch.audio"):
        check_compatible(old, load_config(CONFIG, tiny_overrides + AUDIO), "old.pt")


def test_a_line_read_from_its_image_alone_ignores_the_audio(tiny_overrides):
    model, images = tiny_model(tiny_overrides + AUDIO), torch.rand(2, 1, 32, 256)
    audio = readings()
    plain = model.head(model.backbone(images)).logits                       # what an image-only model computes
    image_on, audio_on = modality_masks(audio.lengths > 0, "image")
    assert torch.equal(model(images, audio, image_on, audio_on).logits, plain)
    assert torch.equal(model(images).logits, plain)
    assert not torch.allclose(model(images, audio).logits, plain)          # both: the audio changes the frames


def test_a_line_read_from_its_audio_alone_ignores_the_image(tiny_overrides):
    model, audio = tiny_model(tiny_overrides + AUDIO), readings()
    masks = modality_masks(audio.lengths > 0, "audio")
    a = model(torch.rand(2, 1, 32, 256), audio, *masks).logits
    b = model(torch.zeros(2, 1, 32, 256), audio, *masks).logits
    assert torch.allclose(a, b, atol=1e-6)
    louder = AudioBatch(audio.waves * 3, audio.lengths)                     # per-line normalised log-mel
    assert torch.allclose(model(torch.zeros(2, 1, 32, 256), louder, *masks).logits, b, atol=1e-4)


def test_audio_encoder_counts_valid_frames_and_ignores_padding():
    enc = AudioEncoder(16, channels=4, hidden=8, layers=1).eval()
    audio = readings((1.0, 0.5))
    out, n = enc(audio.waves, audio.lengths)
    assert out.shape == (2, 26, 16) and n.tolist() == [26, 13]              # 101 and 51 mel frames / 4
    alone, _ = enc(audio.waves[1:, :8000], audio.lengths[1:])
    assert torch.allclose(out[1, :12], alone[0, :12], atol=1e-4)           # the padding's edge only


def test_modality_dropout_shares_and_lines_without_audio():
    torch.manual_seed(0)
    has = torch.tensor([True] * 3000 + [False] * 1000)
    image_on, audio_on = modality_dropout(has, image_only=0.2, audio_only=0.3)
    mixes = np.array(mix_names(image_on, audio_on))
    assert set(mixes[3000:]) == {"image"}                                   # no reading: the image, always
    shares = {m: np.mean(mixes[:3000] == m) for m in ("image", "audio", "both")}
    assert abs(shares["image"] - 0.2) < 0.03 and abs(shares["audio"] - 0.3) < 0.03 and abs(shares["both"] - 0.5) < 0.03
    with pytest.raises(ValueError, match="modality"):
        modality_masks(has, "video")


def test_collate_pads_readings_and_marks_lines_without(spoken):
    root, overrides = spoken
    data = open_split(load_config(CONFIG, overrides), "train")
    assert isinstance(data, SpokenLines) and len(data.audio) == len(data) == 8
    data.audio.pop(data.ids[1])                                             # one line without a reading
    batch = Collate(Charset("abcd"))([data[0], data[1], data[2]])
    assert batch.audio.lengths[1] == 0 and batch.audio.lengths[0] > 8000
    assert batch.audio.waves.shape == (3, int(batch.audio.lengths.max()))
    assert torch.equal(batch.audio.waves[1], torch.zeros_like(batch.audio.waves[1]))


def test_unusable_readings_are_skipped_once_and_the_line_kept(spoken, tmp_path, caplog):
    root, overrides = spoken
    cfg = load_config(CONFIG, overrides)
    data = open_split(cfg, "val")
    bad, long = data.audio[data.ids[0]], data.audio[data.ids[1]]
    data.audio[data.ids[0]] = tmp_path / "broken.wav"
    data.audio[data.ids[0]].write_bytes(b"RIFF....WAVEfmt not really")
    data.audio[data.ids[1]] = tmp_path / "long.wav"
    soundfile.write(data.audio[data.ids[1]], np.full(16000 * 30, 0.1, np.float32), 16000)
    with caplog.at_level(logging.WARNING, logger="htr"):
        for _ in range(2):
            items = [data[0], data[1]]
    assert all(item[3] is None and item[0].shape == (1, 32, 256) for item in items)
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2 and "broken.wav is not audio" in said[0] and "long.wav is 30.0 s long" in said[1]
    assert all("read from its image alone" in m for m in said)
    assert bad.is_file() and long.is_file()                                 # nothing was touched
    with pytest.raises(UserError, match="data.audio_dir=.*no val/ folder"):
        open_split(load_config(CONFIG, overrides + [f"data.audio_dir={tmp_path}"]), "val")


def test_trains_from_the_audio_alone_and_logs_each_mix(spoken):
    """audio_only=1: the image is never seen, yet the CTC loss falls (the reading carries the line); a mixed run
    logs the loss of each modality mix."""
    root, overrides = spoken
    cfg = load_config(CONFIG, overrides + ["train.num_epochs=150", "train.val_every_k_epochs=150", "train.batch_size=8",
                                           "train.modality_dropout.image_only=0", "train.modality_dropout.audio_only=1",
                                           "model.run_name=audio_only"])
    t = training.Trainer(cfg)
    t.fit()
    first, last = t.runlog.rows[0], t.runlog.rows[-1]
    assert "train_ctc_image" not in last and "train_ctc_both" not in last   # no line read from those
    # the loss first sits near first / 8 for tens of steps (blanks and character priors), then falls as the reading
    # gets used; how far in 150 steps depends on the CPU's kernels (first / 17 on a 2-core AMD EPYC, torch 2.13)
    assert last["train_ctc_audio"] < first["train_ctc_audio"] / 12, (first, last)
    assert last["train_audio_ctc"] < first["train_audio_ctc"] / 2, (first, last)   # the audio CTC shortcut
    mixed = training.Trainer(load_config(CONFIG, overrides + ["train.num_epochs=2", "model.run_name=mixed"]))
    mixed.fit()
    logged = set().union(*mixed.runlog.rows)
    assert {"train_ctc_image", "train_ctc_audio", "train_ctc_both"} <= logged


def test_evaluate_reports_image_audio_and_fused_side_by_side(spoken):
    root, overrides = spoken
    cfg = load_config(CONFIG, overrides + ["train.num_epochs=1", "model.run_name=eval"])
    last = training.Trainer(cfg).fit()
    report = evaluate(load_config(CONFIG, overrides), last)
    assert report["modalities"]["lines"] == report["lines"] == 4
    assert {"image", "audio", "both"} <= set(report["modalities"])
    assert all(0 <= report["modalities"][m]["cer"] for m in ("image", "audio", "both"))
    assert report["greedy"] == report["modalities"]["both"]                # every test line has a reading


@pytest.fixture(scope="module")
def trained(spoken):
    """A tiny audio model trained for one epoch on the spoken set, and an image-only one."""
    root, overrides = spoken
    fused = training.Trainer(load_config(CONFIG, overrides + ["train.num_epochs=1", "model.run_name=fused"])).fit()
    image_only = overrides[:-len(AUDIO)] + ["train.num_epochs=1", "model.run_name=image_only"]
    return root, overrides, fused, training.Trainer(load_config(CONFIG, image_only)).fit()


def test_demo_reads_a_line_from_image_and_audio_or_audio_alone(trained, capsys):
    import demo
    root, overrides, fused, image_only = trained
    png, wav = root / "test" / "test-000.png", root / "test" / "test-000.wav"
    demo.main([str(CONFIG), *overrides, f"resume={fused}", str(png), "--audio", str(wav), "--audio", str(wav),
               str(png)])
    rows = [r.split("\t") for r in capsys.readouterr().out.splitlines() if "(ground truth)" not in r]
    assert [r[0] for r in rows] == [f"{png} + {wav}", str(wav), str(png)]
    with pytest.raises(UserError, match="no such file"):
        demo.main([str(CONFIG), *overrides, f"resume={fused}", str(png), "--audio", str(root / "none.wav")])
    with pytest.raises(UserError, match="--audio needs a file"):
        demo.main([str(CONFIG), *overrides, f"resume={fused}", str(png), "--audio"])
    with pytest.raises(UserError, match="reads images only"):
        demo.main([str(CONFIG), *overrides[:-len(AUDIO)], f"resume={image_only}", str(png), "--audio", str(wav)])


def test_transcribe_reads_each_line_with_its_audio_file(trained, tmp_path, capsys):
    """Line images with readings named by their stems in --audio; one unusable reading is a warning and its line
    is still transcribed (from its image)."""
    import json
    import shutil

    import transcribe
    root, overrides, fused, image_only = trained
    audio = tmp_path / "audio"
    audio.mkdir()
    for wav in sorted((root / "test").glob("*.wav"))[:3]:
        shutil.copy(wav, audio)
    (audio / "test-000.wav").write_bytes(b"not audio")
    out = tmp_path / "out"
    transcribe.main([str(CONFIG), *overrides, f"resume={fused}", str(root / "test"), "--out", str(out),
                     "--audio", str(audio)])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["line_images"] == {"transcribed": 4, "of": 4} and summary["lines_with_audio"] == 2
    assert any("test-000.wav is not audio" in w and "image alone" in w for w in summary["warnings"])
    assert "lines read with their audio" in capsys.readouterr().out
    with pytest.raises(UserError, match="reads images only"):
        transcribe.main([str(CONFIG), *overrides[:-len(AUDIO)], f"resume={image_only}", str(root / "test"),
                         "--out", str(tmp_path / "o2"), "--audio", str(audio)])
    with pytest.raises(UserError, match="--audio folder not found"):
        transcribe.main([str(CONFIG), *overrides, f"resume={fused}", str(root / "test"), "--out", str(out),
                         "--audio", str(tmp_path / "nowhere")])


def test_find_reading_looks_in_the_page_folder_first(tmp_path):
    from htr.audio import find_reading
    (tmp_path / "p1").mkdir()
    for name in ("p1/l0.wav", "l0.wav", "l1.flac", "l2.wav", "l2.flac"):
        (tmp_path / name).write_bytes(b"")
    assert find_reading(tmp_path, "l0", "p1") == tmp_path / "p1" / "l0.wav"
    assert find_reading(tmp_path, "l0", "p2") == tmp_path / "l0.wav"
    assert find_reading(tmp_path, "l1", "p1") == tmp_path / "l1.flac"
    assert find_reading(tmp_path, "l2") == tmp_path / "l2.wav"               # the .wav before the .flac
    assert find_reading(tmp_path, "l3", "p1") is None


def test_onnx_export_reads_image_audio_and_both_like_pytorch(trained, tmp_path):
    """export.py writes the audio branch into the graph (audio, audio_lengths, image_on beside images); evaluate
    with runtime=onnx reports the same three columns as with PyTorch; int8 is refused for it."""
    import export
    from htr import onnx_export
    from htr.inference import load_model
    from htr.onnx_runtime import OnnxRecognizer
    root, overrides, fused, _ = trained
    path = tmp_path / "fused.onnx"
    export.main([str(CONFIG), *overrides, f"resume={fused}", str(path)])
    recognizer = OnnxRecognizer(path)
    model = load_model(load_config(CONFIG, overrides), fused)[0]
    assert recognizer.has_audio and onnx_export.parity(model, recognizer, batch_sizes=(1, 3)) < 1e-4
    on_torch = evaluate(load_config(CONFIG, overrides), fused)["modalities"]
    on_onnx = evaluate(load_config(CONFIG, overrides + ["runtime=onnx"]), path)["modalities"]
    assert {m: on_onnx[m]["cer"] for m in ("image", "audio", "both")} == \
        {m: on_torch[m]["cer"] for m in ("image", "audio", "both")}
    with pytest.raises(UserError, match="audio branch's Fourier transform"):
        export.main([str(CONFIG), *overrides, f"resume={fused}", "export.int8=true", str(tmp_path / "q.onnx")])


def test_an_image_model_starts_a_model_with_the_audio_branch(trained):
    """train.init_from an image-only run: its weights are copied, the audio branch starts fresh; resuming it with
    the audio branch on is still refused."""
    root, overrides, fused, image_only = trained
    cfg = load_config(CONFIG, overrides + [f"train.init_from={image_only}", "train.num_epochs=1",
                                           "model.run_name=grown"])
    t = training.Trainer(cfg)
    old, new = load_checkpoint(image_only)["model"], t.model.state_dict()
    assert all(torch.equal(old[k], new[k]) for k in old)
    assert any(k.startswith("fusion.") for k in new)
    with pytest.raises(UserError, match="arch.audio"):
        training.Trainer(load_config(CONFIG, overrides + [f"resume={image_only}"]), (load_checkpoint(image_only),
                                                                                       image_only))


def test_freeze_image_path_trains_the_audio_branch_alone(trained):
    """train.freeze_image_path: the backbone and the head end with the image model's weights and BatchNorm
    statistics (so a line read from its image alone reads as the image model reads it); the audio branch trained."""
    root, overrides, fused, image_only = trained
    cfg = load_config(CONFIG, overrides + [f"train.init_from={image_only}", "train.num_epochs=2",
                                           "train.freeze_image_path=true", "model.run_name=frozen"])
    t = training.Trainer(cfg)
    start = {k: v.clone() for k, v in t.model.state_dict().items()}
    t.fit()
    old, new = load_checkpoint(image_only)["model"], t.acc.unwrap_model(t.model).state_dict()
    assert all(torch.equal(old[k], new[k]) for k in old)
    assert any(not torch.equal(start[k], new[k]) for k in new if k.startswith(AUDIO_MODULES))
    with pytest.raises(UserError, match="train.freeze_image_path=true trains the audio branch beside a trained "
                                        "image model: set arch.audio.enabled=true and train.init_from="):
        training.Trainer(load_config(CONFIG, overrides + ["train.freeze_image_path=true", "model.run_name=x"]))

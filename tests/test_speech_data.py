"""The speech track: espeak-ng readings (htr/speech_synthesis.py), the writer behind prepare_speech.py
(htr/speech_writer.py) and the audio reader (htr/audio.py) with its bad-input handling."""
import json
import logging
import time
from dataclasses import replace

import cv2
import numpy as np
import pytest
import soundfile
import torch
from conftest import render_line, write_split

import prepare_speech
from htr.audio import (AudioError, AudioReader, audio_for_split, check_duration, log_mel, mel_frequencies,
                       read_audio)
from htr.speech_synthesis import SAMPLE_RATE, Espeak, ReadingStyle, read_aloud
from htr.speech_writer import write_speech
from utils import UserError

TEXTS = ["the plants arrived safely", "I have been looking over the seeds which you sent me from the Cape",
         "Kew, March 24 1850", "yours ever & truly"]
PLAIN = ReadingStyle(voice="en", rate=175, pitch=50, pitch_range=50, word_gap=0, lead=0.2, trail=0.2, pauses=(),
                     rt60=0.0, wet=0.0, seed=0, codec="none", level=0.5)


def rms(x) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) if len(x) else 0.0


def say(text: str, style=PLAIN, snr=None, mute=0.0, seed=0):
    return read_aloud(Espeak(), text, style, snr, mute, np.random.default_rng(seed), np.random.default_rng(seed + 1))


def span(audio, words, k):
    return audio[round(words[k][0] * SAMPLE_RATE):round(words[k][1] * SAMPLE_RATE)]


@pytest.fixture
def lines(tmp_path):
    write_split(tmp_path / "lines", "val", TEXTS)
    return tmp_path / "lines"


def wavs(folder) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.wav"))}


# ------------------------------------------------------------------------------------------------- synthesis
def test_a_reading_is_speech_in_its_word_spans_and_grows_with_the_text():
    short, long = say(TEXTS[0]), say(TEXTS[1])
    assert short.audio.dtype == np.float32 and len(long.audio) > 1.8 * len(short.audio)
    assert len(short.words) == 4 and all(w is not None for w in short.words)
    starts = [w[0] for w in long.words]
    assert starts == sorted(starts) and long.words[-1][1] <= len(long.audio) / SAMPLE_RATE
    assert rms(short.audio[:round(0.19 * SAMPLE_RATE)]) < 1e-4                     # the lead silence
    assert min(rms(span(short.audio, short.words, k)) for k in range(4)) > 0.02   # speech in every word


def test_styles_change_the_sound_and_pauses_move_the_words():
    slow, fast = say(TEXTS[0], replace(PLAIN, rate=130)), say(TEXTS[0], replace(PLAIN, rate=210))
    assert len(slow.audio) > 1.2 * len(fast.audio)
    paused = say(TEXTS[0], replace(PLAIN, pauses=((2, 0.4),)))
    plain = say(TEXTS[0])
    assert paused.words[1] == plain.words[1]
    assert paused.words[2][0] == pytest.approx(plain.words[2][0] + 0.4, abs=0.002)
    assert len(paused.audio) - len(plain.audio) == round(0.4 * SAMPLE_RATE)


def test_a_line_sounds_the_same_after_other_lines_and_a_second_later():
    """espeak-ng keeps state in C statics and seeds its noise (breath, in the f3 variant) with the time in
    seconds."""
    breathy = replace(PLAIN, voice="en+f3")
    first = say(TEXTS[3], breathy).audio
    say(TEXTS[1], replace(PLAIN, voice="en-us+m3"))
    time.sleep(1.0)
    assert np.array_equal(say(TEXTS[3], breathy).audio, first)
    assert not np.array_equal(say(TEXTS[3], replace(breathy, seed=1)).audio, first)


def test_unknown_voices_are_refused():
    for voice, message in (("qq", "unknown espeak-ng voice 'qq'"), ("en+zz", "unknown espeak-ng variant 'zz'")):
        with pytest.raises(UserError, match=message):
            Espeak().check_voice(voice)


def measured_snr(noisy, clean) -> float:
    """SNR of `noisy` against `clean` of the same reading, after undoing a common gain (the anti-clip scaling)."""
    gain = np.dot(noisy, clean) / np.dot(clean, clean)
    return 10 * np.log10(np.mean(clean ** 2) / np.mean((noisy / gain - clean) ** 2))


def test_written_noise_meets_its_snr(lines, tmp_path):
    audio = {}
    for snr in ("clean", "20", "5"):
        write_speech(lines, ["val"], snr=[snr], out=tmp_path / snr)
        audio[snr] = {p.name: soundfile.read(p)[0] for p in (tmp_path / snr / "val").glob("*.wav")}
    for name, clean in audio["clean"].items():
        for snr in (20, 5):
            assert measured_snr(audio[str(snr)][name], clean) == pytest.approx(snr, abs=1.0), (name, snr)


def test_muted_words_are_silent_in_their_spans():
    text = TEXTS[1]
    muted, plain = say(text, mute=0.3), say(text)
    assert len(muted.muted) in (4, 5) and len(plain.muted) == 0                    # 30 % of 14 words
    for k in muted.muted:
        assert rms(span(muted.audio, muted.words, k)) < 0.01 * rms(span(plain.audio, plain.words, k))
    kept = [k for k in range(len(text.split())) if k not in muted.muted]
    assert all(np.array_equal(span(muted.audio, muted.words, k)[100:-100], span(plain.audio, plain.words, k)[100:-100])
               for k in kept)


# ------------------------------------------------------------------------------------------------- the writer
def test_same_seed_same_bytes_whatever_the_workers_and_sharded_splits(tmp_path):
    root = tmp_path / "lines"
    for k in range(2):                                                  # a sharded split, and one being written
        write_split(root / "train", f"shard-{k:05d}", TEXTS[k * 2:k * 2 + 2])
    (root / "train" / "shard-00002").mkdir()
    settings = dict(snr=["clean", "20"], mute_words=0.3, seed=3)
    write_speech(root, ["train"], workers=1, out=tmp_path / "one", **settings)
    prepare_speech.main([str(root), "--splits", "train", "--workers", "2", "--out", str(tmp_path / "two"),
                         "--snr", "clean", "20", "--mute-words", "0.3", "--seed", "3"])
    for shard in ("shard-00000", "shard-00001"):
        one, two = tmp_path / "one" / "train" / shard, tmp_path / "two" / "train" / shard
        assert len(wavs(one)) == 2 and wavs(one) == wavs(two)
        assert (one / "speech.json").read_bytes() == (two / "speech.json").read_bytes()
        info = soundfile.info(next(one.glob("*.wav")))
        assert (info.samplerate, info.channels, info.subtype) == (SAMPLE_RATE, 1, "PCM_16")
    write_speech(root, ["train"], out=tmp_path / "other", **{**settings, "seed": 4})
    assert wavs(tmp_path / "other" / "train" / "shard-00000") != wavs(tmp_path / "one" / "train" / "shard-00000")


def test_a_rerun_skips_complete_lines_and_redoes_missing_ones(lines, capsys):
    first = write_speech(lines, ["val"], snr=["20"])
    before = wavs(lines / "val")
    assert first["lines_written"] == 4 and len(before) == 4
    assert write_speech(lines, ["val"], snr=["20"])["lines_skipped"] == 4
    gone = sorted(before)[1]
    (lines / "val" / gone).unlink()
    again = write_speech(lines, ["val"], snr=["20"])
    assert (again["lines_written"], again["lines_skipped"]) == (1, 3) and wavs(lines / "val") == before
    assert "1 readings written, 3 skipped (already complete)" in capsys.readouterr().out
    record = json.loads((lines / "val" / "speech.json").read_text())
    assert sorted(record["lines"]) == [n[:-4] for n in sorted(before)]
    assert record["lines"]["val-003"]["text"] == TEXTS[3] and len(record["lines"]["val-003"]["words"]) == 4


def test_other_settings_and_foreign_audio_are_refused_unless_forced(lines):
    write_speech(lines, ["val"], snr=["20"])
    with pytest.raises(UserError, match=r"other settings: snr \[20.0\] \(now \[5.0\]\).*--force"):
        write_speech(lines, ["val"], snr=["5"])
    assert write_speech(lines, ["val"], snr=["5"], force=True)["lines_written"] == 4
    (lines / "val" / "speech.json").unlink()
    with pytest.raises(UserError, match="4 audio file.*did not write.*--out DIR.*--force"):
        write_speech(lines, ["val"], snr=["5"])
    for bad, message in (({"snr": ["loud"]}, "--snr takes `clean` or a number"), ({"mute_words": 1.0}, "in \\[0, 1\\)"),
                         ({"splits": ["nope"]}, "split folder not found")):
        with pytest.raises(UserError, match=message):
            write_speech(lines, **{"splits": ["val"], **bad})


def test_lines_without_an_image_get_no_audio(lines, caplog):
    (lines / "val" / "val-002.png").unlink()
    summary = write_speech(lines, ["val"])
    assert summary["lines_without_image"] == 1 and "val-002.wav" not in wavs(lines / "val")
    assert "skipped 1 line(s) without an image" in caplog.text


# ------------------------------------------------------------------------------------------------- reading
def tone(seconds: float, rate: int, hz: float = 1000.0, channels: int = 1, level: float = 0.5) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    return np.repeat((level * np.sin(2 * np.pi * hz * t))[:, None], channels, axis=1).astype(np.float32)


def test_other_rates_and_channels_are_converted_and_said_once(tmp_path, caplog):
    for k in range(2):
        soundfile.write(tmp_path / f"{k}.wav", tone(0.5, 44100, channels=2), 44100)
    reader = AudioReader()
    with caplog.at_level(logging.WARNING):
        audio = [reader.read(tmp_path / f"{k}.wav") for k in range(2)]
    assert audio[0].shape == (8000,) and audio[0].dtype == np.float32
    assert caplog.text.count("resampled to 16000 Hz mono") == 1 and "44100 Hz with 2 channel(s)" in caplog.text
    spectrum = np.abs(np.fft.rfft(audio[1]))
    assert np.argmax(spectrum) * SAMPLE_RATE / len(audio[1]) == pytest.approx(1000, abs=5)


def test_bad_audio_is_named(tmp_path, caplog):
    good = tmp_path / "good.wav"
    soundfile.write(good, tone(1.0, SAMPLE_RATE), SAMPLE_RATE, subtype="PCM_16")
    (tmp_path / "text.wav").write_text("this is not audio at all " * 20)
    (tmp_path / "cut.wav").write_bytes(good.read_bytes()[:12000])
    soundfile.write(tmp_path / "cut.flac", tone(1.0, SAMPLE_RATE), SAMPLE_RATE)
    (tmp_path / "cut.flac").write_bytes((tmp_path / "cut.flac").read_bytes()[:3000])
    soundfile.write(tmp_path / "silent.wav", np.zeros(16000, np.float32), SAMPLE_RATE)
    for name, message in (("text.wav", "is not audio"), ("cut.wav", "is truncated"),
                          ("cut.flac", "(truncated|corrupt)"), ("silent.wav", "is silent")):
        with pytest.raises(AudioError, match=f"{tmp_path / name}.*{message}"):
            read_audio(tmp_path / name)
    soundfile.write(tmp_path / "loud.wav", np.sign(tone(1.0, SAMPLE_RATE)), SAMPLE_RATE, subtype="PCM_16")
    assert len(read_audio(tmp_path / "loud.wav")) == 16000 and f"{tmp_path / 'loud.wav'} is clipped" in caplog.text
    assert len(read_audio(good)) == 16000
    check_duration(4.0, "a short line", good)
    with pytest.raises(AudioError, match="good.wav is 60.0 s long, more than the 9 s its 12-character line"):
        check_duration(60.0, "a short line", good)


def test_audio_for_split_lists_lines_with_audio_and_skips_audio_without_image(lines, tmp_path, caplog):
    val = lines / "val"
    for name in ("val-000", "val-002", "stray"):
        soundfile.write(val / f"{name}.wav", tone(0.2, SAMPLE_RATE), SAMPLE_RATE)
    soundfile.write(val / "val-001.flac", tone(0.2, SAMPLE_RATE), SAMPLE_RATE)
    with caplog.at_level(logging.INFO):
        found = audio_for_split(val)
    assert sorted(found) == ["val-000", "val-001", "val-002"] and found["val-001"].suffix == ".flac"
    assert "skipped audio of 1 line(s) without an image" in caplog.text and "stray" in caplog.text
    assert "3 of 4 line image(s) have audio" in caplog.text
    mirror = tmp_path / "audio" / "val"
    mirror.mkdir(parents=True)
    soundfile.write(mirror / "val-003.wav", tone(0.2, SAMPLE_RATE), SAMPLE_RATE)
    assert list(audio_for_split(val, mirror)) == ["val-003"]
    cv2.imwrite(str(val / "extra.png"), render_line("x"))                     # an image without audio: normal
    assert len(audio_for_split(val)) == 3


# ------------------------------------------------------------------------------------------------- features
def test_log_mel_shape_and_a_tone_in_its_bin():
    wave = torch.from_numpy(tone(1.0, SAMPLE_RATE)[:, 0])
    mel = log_mel(wave)
    assert mel.shape == (80, 16000 // 160 + 1) and mel.dtype == torch.float32
    assert log_mel(torch.stack([wave, wave]), n_mels=40).shape == (2, 40, 101)
    centres = mel_frequencies(80, 0, SAMPLE_RATE / 2)[1:-1]
    assert mel.mean(dim=1).argmax().item() == np.argmin(np.abs(centres - 1000))
    assert log_mel(torch.zeros(1600)).min().item() == pytest.approx(np.log(1e-10))

"""The one place audio is read: `<id>.wav` / `<id>.flac` beside a line's `<id>.png` (real recordings, or readings
written by prepare_speech.py), as float32 mono at 16 kHz; which lines of a split have audio; log-mel features.
Bad files are an AudioError (a UserError naming the file) for the caller to skip and log; clipping is a warning."""
import functools
import logging
import math
import re
from pathlib import Path

import numpy as np
import soundfile
import torch
import torch.nn.functional as F
from scipy.signal import resample_poly

from dataset import LineDataset, split_folders
from utils import UserError

log = logging.getLogger("htr")

SAMPLE_RATE = 16000
AUDIO_SUFFIXES = (".wav", ".flac")       # a line with both: the .wav
SILENT_PEAK = 1e-4                       # -80 dBFS: nothing but dither
CLIPPED_SHARE = 0.001                    # samples at full scale that make a file clipped
# Speech runs at ~12-15 characters/s, espeak-ng's slowest rate (80 wpm) at ~6 (0.15 s a character). Audio longer
# than MAX_SILENCE_S plus about three times that per character of its line is some other audio (or several lines).
MAX_SECONDS_PER_CHAR = 0.5
MAX_SILENCE_S = 3.0
TRUNCATED = re.compile(r"^data\s*:\s*(\d+) \(should be (\d+)\)", re.M)   # libsndfile's note on a short data chunk


class AudioError(UserError):
    """A line's audio cannot be used (not audio, truncated, silent, far too long); the message names the file."""


class AudioReader:
    """Reads audio files as float32 mono at `sample_rate`; another rate or channel count is resampled and
    downmixed, and said once per reader (one per process by default: read_audio's) rather than once per file."""

    def __init__(self, sample_rate: int = SAMPLE_RATE):
        self.sample_rate = sample_rate
        self.converted = set()                           # (rate, channels) already reported

    def read(self, path) -> np.ndarray:
        """(samples,) float32 in [-1, 1]; AudioError for a file that is not audio, truncated or silent."""
        path = Path(path)
        try:
            info = soundfile.info(str(path))
            audio, rate = soundfile.read(str(path), dtype="float32", always_2d=True)   # (samples, channels)
        except (soundfile.LibsndfileError, RuntimeError) as e:
            raise AudioError(f"{path} is not audio, or is corrupt or truncated ({e}); replace or delete it "
                             f"(a .wav or .flac is expected)") from None
        self._check_complete(path, info, len(audio))
        if rate != self.sample_rate or audio.shape[1] != 1:
            audio = self._convert(path, audio, rate)
        audio = audio[:, 0]
        self._check_level(path, audio)
        return audio

    @staticmethod
    def _check_complete(path: Path, info, n_read: int) -> None:
        """A file cut short (a copy or download that stopped): its header promises more than it holds."""
        short = TRUNCATED.search(info.extra_info)
        if short and int(short.group(1)) > int(short.group(2)) or n_read < info.frames:
            raise AudioError(f"{path} is truncated: its header promises more audio than the file holds (an "
                             f"interrupted copy?); copy it again or delete it")

    def _convert(self, path: Path, audio: np.ndarray, rate: int) -> np.ndarray:
        channels = audio.shape[1]
        if (rate, channels) not in self.converted:
            self.converted.add((rate, channels))
            log.warning("audio at %d Hz with %d channel(s) (first: %s) is resampled to %d Hz mono as it is read; "
                        "said once for all such files. Convert them once to save the time", rate, channels,
                        path, self.sample_rate)
        mono = audio.mean(axis=1)
        if rate != self.sample_rate:
            g = np.gcd(rate, self.sample_rate)
            mono = resample_poly(mono, self.sample_rate // g, rate // g)
        return mono.astype(np.float32)[:, None]

    @staticmethod
    def _check_level(path: Path, audio: np.ndarray) -> None:
        peak = np.max(np.abs(audio), initial=0)
        if peak < SILENT_PEAK:
            raise AudioError(f"{path} is silent (peak {peak:.1e}); record it again or delete it")
        clipped = np.mean(np.abs(audio) >= 0.999)
        if clipped > CLIPPED_SHARE:
            log.warning("%s is clipped (%.1f%% of its samples at full scale): recorded too loud; it is used as "
                        "it is", path, 100 * clipped)


@functools.cache
def process_reader(sample_rate: int) -> AudioReader:
    """This process's reader for a rate: it says each conversion once."""
    return AudioReader(sample_rate)


def read_audio(path, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """A file as (samples,) float32 mono at sample_rate (see AudioReader)."""
    return process_reader(sample_rate).read(path)


def check_duration(seconds: float, text: str, path) -> None:
    """AudioError when audio is far longer than its line could take to say: MAX_SILENCE_S + MAX_SECONDS_PER_CHAR
    per character (a 40-character line: 23 s)."""
    bound = MAX_SILENCE_S + MAX_SECONDS_PER_CHAR * len(text)
    if seconds > bound:
        raise AudioError(f"{path} is {seconds:.1f} s long, more than the {bound:.0f} s its {len(text)}-character "
                         f"line could take to say: audio of another line, or of several? Fix or delete it")


def audio_files(folder: Path, audio_folder: Path | None = None) -> dict:
    """{line id: audio file} of one folder of lines, the audio beside the images or in `audio_folder`. Audio whose
    line has no image is skipped with one warning."""
    audio_folder = audio_folder or folder
    found = {}
    for suffix in reversed(AUDIO_SUFFIXES):                        # the first suffix wins
        found.update({p.stem: p for p in audio_folder.glob(f"*{suffix}") if not p.name.startswith(".")})
    orphans = sorted(i for i in found if not (folder / f"{i}.png").is_file())
    if orphans:
        log.warning("%s: skipped audio of %d line(s) without an image %s.png: %s%s", audio_folder, len(orphans),
                    folder / "<id>", ", ".join(orphans[:5]), " ..." if len(orphans) > 5 else "")
    return {i: p for i, p in found.items() if i not in orphans}


def audio_for_split(split_dir, audio_dir=None) -> dict:
    """{line id: audio file} of a split (flat or sharded, as dataset.split_folders reads it); with audio_dir the
    audio lies in a mirror of the split's layout (prepare_speech.py --out). Lines without audio are normal."""
    split_dir, found, n_lines = Path(split_dir), {}, 0
    for folder in split_folders(split_dir):
        found.update(audio_files(folder, Path(audio_dir) / folder.relative_to(split_dir) if audio_dir else None))
        n_lines += sum(1 for _ in folder.glob("*.png"))
    log.info("%s: %d of %d line image(s) have audio", split_dir, len(found), n_lines)
    return found


class SpokenLines(LineDataset):
    """A LineDataset whose items also carry the line's reading: (image, text, id, wave (samples,) float32 at 16 kHz
    or None). The audio lies beside the images, or with `audio_dir` under audio_dir/<split>/ (prepare_speech.py
    --out). A reading that cannot be used (AudioError, check_duration) is skipped with one warning per file: the
    line is then read from its image alone."""

    def __init__(self, root, split: str, *args, audio_dir=None, **kwargs):
        super().__init__(root, split, *args, **kwargs)
        if audio_dir is not None and not (Path(audio_dir) / split).is_dir():
            raise UserError(f"data.audio_dir={audio_dir} has no {split}/ folder: give the --out folder of "
                            f"prepare_speech.py (audio in <dir>/<split>/<id>.wav), or leave it empty for audio "
                            f"beside the images")
        self.audio = audio_for_split(self.split_dir, Path(audio_dir) / split if audio_dir else None)
        self.unusable = set()                                          # files already reported by this process

    def reading(self, i: int):
        path = self.audio.get(self.ids[i])
        if path is None or path in self.unusable:
            return None
        try:
            wave = read_audio(path)
            check_duration(len(wave) / SAMPLE_RATE, self.texts[i], path)
            return wave
        except AudioError as e:
            self.unusable.add(path)
            log.warning("%s. Line %s is read from its image alone", e, self.ids[i])
            return None

    def __getitem__(self, i):
        return (*super().__getitem__(i), self.reading(i))


def find_reading(folder: Path, line_id: str, page: str | None = None) -> Path | None:
    """A line's reading in a folder of per-line audio (transcribe.py --audio): <page>/<line id>.wav, else
    <line id>.wav (.flac as well), or None."""
    places = ([folder / page] if page else []) + [folder]
    return next((p for place in places for s in AUDIO_SUFFIXES if (p := place / f"{line_id}{s}").is_file()), None)


def open_split(cfg, split: str, augment: bool = False, max_frames: int | None = None) -> LineDataset:
    """data.path/<split> as the model reads it: a LineDataset, or SpokenLines (with their readings) when the model
    has the audio branch (arch.audio.enabled)."""
    pre, audio = cfg.preproc, cfg.arch.get("audio")
    args = (cfg.data.path, split, pre.image_height, pre.image_width, cfg.data.cache, augment, max_frames)
    if audio is not None and audio.enabled:
        return SpokenLines(*args, audio_dir=cfg.data.get("audio_dir"))
    return LineDataset(*args)


# ------------------------------------------------------------------------------------------------ features
def mel_frequencies(n_mels: int, f_min: float, f_max: float) -> np.ndarray:
    """n_mels + 2 frequencies (Hz) evenly spaced on the HTK mel scale: the filters' edges and centres."""
    mel = np.linspace(*(2595 * np.log10(1 + np.array([f_min, f_max]) / 700)), n_mels + 2)
    return 700 * (10 ** (mel / 2595) - 1)


@functools.cache                                     # built once per size, not at every forward
def mel_filterbank(n_mels: int, n_fft: int, sample_rate: int, f_min: float, f_max: float) -> torch.Tensor:
    """(n_mels, n_fft // 2 + 1) triangular filters, each peaking at 1 on its centre frequency."""
    edges = torch.from_numpy(mel_frequencies(n_mels, f_min, f_max)).float()           # (n_mels + 2,)
    bins = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1)                           # (F,)
    low, centre, high = edges[:-2, None], edges[1:-1, None], edges[2:, None]            # (n_mels, 1) each
    rising, falling = (bins - low) / (centre - low), (high - bins) / (high - centre)    # (n_mels, F)
    return torch.clamp(torch.minimum(rising, falling), min=0)


@functools.cache                                     # built once per size, not at every forward
def dft_basis(n_fft: int) -> torch.Tensor:
    """(2F, 1, n_fft) Hann-windowed cosines and sines of the F = n_fft // 2 + 1 bins: a Conv1d weight that computes
    the short-time Fourier transform (exportable to ONNX, where torch.stft's complex output is not)."""
    t, k = torch.arange(n_fft).float(), torch.arange(n_fft // 2 + 1).float()[:, None]
    angle = 2 * math.pi * k * t / n_fft                                                 # (F, n_fft)
    return (torch.cat([angle.cos(), -angle.sin()]) * torch.hann_window(n_fft))[:, None]


def log_mel(wave, sample_rate: int = SAMPLE_RATE, n_mels: int = 80, n_fft: int = 400, hop: int = 160,
            f_min: float = 0.0, f_max: float | None = None) -> torch.Tensor:
    """Natural-log mel power spectrogram: (..., samples) -> (..., n_mels, frames), frames = samples // hop + 1
    (25 ms Hann windows every 10 ms at 16 kHz, centred, zeros beyond the ends: a wave zero-padded in a batch keeps
    the frames it has alone); powers below 1e-10 are clamped. The transform is a convolution with dft_basis."""
    wave = torch.as_tensor(wave, dtype=torch.float32)
    flat = F.pad(wave.reshape(-1, 1, wave.shape[-1]), (n_fft // 2, n_fft // 2))         # (B, 1, samples + n_fft)
    spec = F.conv1d(flat, dft_basis(n_fft).to(wave.device), stride=hop)                 # (B, 2F, frames)
    bins = n_fft // 2 + 1
    power = spec[:, :bins] ** 2 + spec[:, bins:] ** 2                                   # (B, F, frames)
    bank = mel_filterbank(n_mels, n_fft, sample_rate, f_min, f_max or sample_rate / 2).to(wave.device)
    mel = bank @ power                                                                  # (B, n_mels, frames)
    return torch.log(mel.clamp(min=1e-10)).reshape(*wave.shape[:-1], n_mels, -1)

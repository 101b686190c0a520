"""Spoken readings of text lines: espeak-ng (the espeakng-loader wheel's libespeak-ng.so and espeak-ng-data, driven
through its C API, speak_lib.h, with ctypes) plus effects in numpy: pauses, a room (reverberation), a codec and
background noise at a set SNR, and muted words. Every random choice comes from generators the caller seeds, so a
line's reading depends on its seeds alone (see htr/speech_writer.py)."""
import _ctypes
import bisect
import ctypes
import re
from dataclasses import dataclass
from pathlib import Path

import espeakng_loader
import numpy as np
from scipy.fft import irfft, next_fast_len, rfft, rfftfreq
from scipy.signal import fftconvolve, resample_poly

from htr.audio import SAMPLE_RATE  # what every reading is written at (16 kHz mono int16 wav)
from utils import UserError

VOICES = ("en", "en-us", "en+f2", "en+f4", "en-us+f3", "en-us+m3", "en-gb-x-rp+m5", "en-gb-scotland+f1")
CODECS = ("none", "mulaw", "narrowband", "both")
CODEC_ODDS = (0.5, 0.2, 0.2, 0.1)
MUTE_FADE_S = 0.005                        # ramps at the edges of a muted word (no click)

# speak_lib.h
AUDIO_OUTPUT_SYNCHRONOUS, CHARS_UTF8, POS_CHARACTER = 2, 1, 1
EVENT_WORD, EVENT_END, EVENT_MSG_TERMINATED = 1, 5, 6
RATE, PITCH, RANGE, WORDGAP = 1, 3, 4, 7   # espeak_PARAMETER


class Event(ctypes.Structure):
    """espeak_EVENT."""
    class Id(ctypes.Union):
        _fields_ = [("number", ctypes.c_int), ("name", ctypes.c_char_p), ("string", ctypes.c_char * 8)]

    _fields_ = [("type", ctypes.c_int), ("unique_identifier", ctypes.c_uint), ("text_position", ctypes.c_int),
                ("length", ctypes.c_int), ("audio_position", ctypes.c_int), ("sample", ctypes.c_int),
                ("user_data", ctypes.c_void_p), ("id", Id)]


SYNTH_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(Event))


@dataclass(frozen=True)
class Speech:
    """Audio (float32 in [-1, 1]) and the time span (start, end) in seconds of every whitespace-separated word of
    the text, None for a word espeak-ng did not speak."""
    audio: np.ndarray
    sample_rate: int
    words: list


class Espeak:
    """espeak-ng in this process. Its synthesiser keeps state in C statics (the pitch flutter's phase, among
    others), so the same call gives other samples depending on what was said before; every utterance therefore
    loads a fresh copy of the library (dlopen/dlclose, ~1 ms) and seeds its noise source, and a line sounds the
    same whichever worker says it, after whatever and whenever."""

    def __init__(self):
        self.library = espeakng_loader.get_library_path()
        self.data = Path(espeakng_loader.get_data_path())
        self._callback = SYNTH_CALLBACK(self._collect)     # kept: the library holds only a pointer to it
        self._samples, self._events = [], []

    def _collect(self, wav, n_samples: int, events) -> int:
        if wav and n_samples:
            self._samples.append(np.ctypeslib.as_array(wav, (n_samples,)).copy())
        k = 0
        while events[k].type:                                  # the list ends with espeakEVENT_LIST_TERMINATED
            e = events[k]
            self._events.append((e.type, e.text_position - 1, e.audio_position / 1000))  # 0-based char, seconds
            k += 1
        return 0                                               # go on

    def _open(self) -> tuple:
        lib = ctypes.CDLL(self.library)
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                                     ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        rate = lib.espeak_Initialize(AUDIO_OUTPUT_SYNCHRONOUS, 0, str(self.data.parent).encode(), 0)
        if rate <= 0:
            raise UserError(f"espeak-ng could not start from {self.library} with data {self.data}; reinstall the "
                            f"espeakng-loader wheel (pip install -r requirements.txt)")
        lib.espeak_SetSynthCallback(self._callback)
        return lib, rate

    @staticmethod
    def _close(lib) -> None:
        lib.espeak_Terminate()
        _ctypes.dlclose(lib._handle)

    def check_voice(self, voice: str) -> None:
        """A voice is an espeak-ng language (en, en-us, en-gb-x-rp, ...) with an optional +variant (en+f3): both
        must exist, else one UserError (espeak-ng itself ignores an unknown variant)."""
        language, _, variant = voice.partition("+")
        lib, _ = self._open()
        try:
            known = lib.espeak_SetVoiceByName(language.encode()) == 0
        finally:
            self._close(lib)
        variants = self.data / "voices" / "!v"
        if not known:
            raise UserError(f"unknown espeak-ng voice {language!r} in --voices {voice!r}; English ones are e.g. "
                            f"en, en-us, en-gb-x-rp, en-gb-scotland, en-029 (see {self.data / 'lang'})")
        if variant and not (variants / variant).is_file():
            raise UserError(f"unknown espeak-ng variant {variant!r} in --voices {voice!r}; variants are e.g. "
                            f"f1-f5, m1-m8, klatt, whisper (the files in {variants})")

    def say(self, text: str, voice: str, rate: int, pitch: int, pitch_range: int, word_gap: int,
            seed: int = 0) -> Speech:
        """Synthesise `text` (rate in words per minute, 80-450; pitch and range 0-100, 50 normal; word_gap in
        10 ms units) at espeak-ng's own sample rate (22050 Hz), with each word's span from its word events. `seed`
        seeds espeak-ng's noise source, which espeak_Initialize seeds with the time in seconds."""
        self._samples, self._events = [], []
        lib, sample_rate = self._open()
        try:
            lib.espeak_ng_SetRandSeed(ctypes.c_long(seed))
            if lib.espeak_SetVoiceByName(voice.encode()) != 0:
                raise UserError(f"unknown espeak-ng voice {voice!r}")
            for parameter, value in ((RATE, rate), (PITCH, pitch), (RANGE, pitch_range), (WORDGAP, word_gap)):
                lib.espeak_SetParameter(parameter, value, 0)
            data = text.encode()
            if lib.espeak_Synth(data, len(data) + 1, 0, POS_CHARACTER, 0, CHARS_UTF8, None, None) != 0:
                raise RuntimeError(f"espeak-ng failed to synthesise {text!r}")
        finally:
            self._close(lib)
        audio = np.concatenate(self._samples or [np.zeros(0, np.int16)]).astype(np.float32) / 32768
        return Speech(audio, sample_rate, word_spans(text, self._events, len(audio) / sample_rate))


def word_spans(text: str, events: list, duration: float) -> list:
    """(start, end) seconds of every whitespace-separated word of `text` from espeak-ng's events (type, 0-based
    character, seconds): a word starts at its first word event (a number spoken as several words has several) and
    ends at the next event of another word or at a clause end. espeak-ng reads some short words together with the
    word before ("have been", "from the") and reports one event for both: that span is shared among them by their
    lengths. None for a word before any event."""
    tokens = [(m.start(), m.end()) for m in re.finditer(r"\S+", text)]
    starts = [start for start, _ in tokens]

    def token_of(char: int):
        k = bisect.bisect_right(starts, char) - 1
        return k if k >= 0 and char < tokens[k][1] else None

    marks = sorted(((t, token_of(c) if kind == EVENT_WORD else None) for kind, c, t in events
                    if kind in (EVENT_WORD, EVENT_END, EVENT_MSG_TERMINATED)), key=lambda mark: mark[0])
    spans = [None] * len(tokens)
    for k, (t, token) in enumerate(marks):
        if token is not None and spans[token] is None:
            spans[token] = (t, next((u for u, other in marks[k + 1:] if other != token and u > t), duration))
    said = [k for k, span in enumerate(spans) if span is not None]
    for k, stop in zip(said, said[1:] + [len(tokens)]):
        spans[k:stop] = share(spans[k], [end - start + 1 for start, end in tokens[k:stop]])
    return spans


def share(span: tuple, weights: list) -> list:
    """span cut into consecutive pieces in proportion to weights."""
    edges = span[0] + (span[1] - span[0]) * np.cumsum([0] + weights) / sum(weights)
    return [(round(float(a), 3), round(float(b), 3)) for a, b in zip(edges, edges[1:])]


# ------------------------------------------------------------------------------------------------- style
@dataclass(frozen=True)
class ReadingStyle:
    """How one line is read: the espeak-ng voice and its settings, silences, the room and the codec."""
    voice: str
    rate: int                  # words per minute
    pitch: int                 # 0-100, 50 normal
    pitch_range: int           # 0-100, 0 monotone
    word_gap: int              # extra pause between words, 10 ms units
    lead: float                # silence before and after the speech, seconds
    trail: float
    pauses: tuple              # (word index, seconds): a pause before that word
    rt60: float                # room reverberation time in seconds; 0: no room
    wet: float                 # reverberated share of the room's sound
    seed: int                  # espeak-ng's noise source (aspiration, fricatives) and the room's impulse response
    codec: str                 # one of CODECS
    level: float               # peak level of the speech before the noise

    @classmethod
    def sample(cls, rng: np.random.Generator, voices, n_words: int) -> "ReadingStyle":
        """A style drawn from rng: rate 130-210 wpm, pitch 30-70, range 30-80, word gap 0-20 ms, 0.1-0.4 s of
        silence before and after, a 0.15-0.5 s pause before 10 % of the words, a room (RT60 0.15-0.6 s) half of
        the time, a codec after CODEC_ODDS, peak level 0.3-0.7."""
        room = rng.random() < 0.5
        return cls(voice=voices[rng.integers(len(voices))], rate=int(rng.integers(130, 211)),
                   pitch=int(rng.integers(30, 71)), pitch_range=int(rng.integers(30, 81)),
                   word_gap=int(rng.integers(0, 3)), lead=round(rng.uniform(0.1, 0.4), 3),
                   trail=round(rng.uniform(0.1, 0.4), 3),
                   pauses=tuple((k, round(rng.uniform(0.15, 0.5), 3)) for k in range(1, n_words)
                                if rng.random() < 0.1),
                   rt60=round(rng.uniform(0.15, 0.6), 3) if room else 0.0, wet=round(rng.uniform(0.1, 0.4), 3),
                   seed=int(rng.integers(2 ** 31)), codec=str(rng.choice(CODECS, p=CODEC_ODDS)),
                   level=round(rng.uniform(0.3, 0.7), 3))


# ------------------------------------------------------------------------------------------------- effects
def to_16k(speech: Speech) -> Speech:
    """espeak-ng's 22050 Hz -> SAMPLE_RATE (polyphase, 320/441)."""
    g = np.gcd(SAMPLE_RATE, speech.sample_rate)
    audio = resample_poly(speech.audio, SAMPLE_RATE // g, speech.sample_rate // g).astype(np.float32)
    return Speech(audio, SAMPLE_RATE, speech.words)


def add_pauses(speech: Speech, style: ReadingStyle) -> Speech:
    """Silence before and after the speech and before the style's pause words; the word spans move with it."""
    sr, audio = speech.sample_rate, speech.audio
    cuts = sorted((speech.words[k][0], pause) for k, pause in style.pauses if speech.words[k] is not None)
    pieces, done = [np.zeros(round(style.lead * sr), np.float32)], 0
    for at, pause in cuts:
        pieces += [audio[done:round(at * sr)], np.zeros(round(pause * sr), np.float32)]
        done = round(at * sr)
    pieces += [audio[done:], np.zeros(round(style.trail * sr), np.float32)]

    def moved(span):                                 # a word moves by the silences before its start
        shift = style.lead + sum(pause for at, pause in cuts if at <= span[0])
        return round(span[0] + shift, 3), round(span[1] + shift, 3)
    return Speech(np.concatenate(pieces), sr, [None if w is None else moved(w) for w in speech.words])


def reverberate(audio: np.ndarray, sample_rate: int, style: ReadingStyle) -> np.ndarray:
    """A room: the dry sound plus `wet` of it convolved with noise under an exponential decay that falls 60 dB
    in rt60 seconds (the tail is cut at the end of the audio, which ends in silence)."""
    if not style.rt60:
        return audio
    t = np.arange(round(style.rt60 * sample_rate)) / sample_rate
    tail = np.random.default_rng(style.seed).standard_normal(len(t)) * np.exp(-6.9 * t / style.rt60)
    tail /= np.sqrt(np.sum(tail ** 2))
    wet = fftconvolve(audio, tail)[:len(audio)]
    return ((1 - style.wet) * audio + style.wet * wet).astype(np.float32)


def mulaw(audio: np.ndarray, mu: int = 255) -> np.ndarray:
    """Through 8-bit mu-law (G.711) and back: quantisation noise that follows the signal's level."""
    y = np.sign(audio) * np.log1p(mu * np.abs(np.clip(audio, -1, 1))) / np.log1p(mu)
    y = np.round((y + 1) / 2 * 255) / 255 * 2 - 1
    return (np.sign(y) * np.expm1(np.abs(y) * np.log1p(mu)) / mu).astype(np.float32)


def apply_codec(audio: np.ndarray, codec: str) -> np.ndarray:
    """narrowband: down to 8 kHz and back (nothing above 4 kHz, as on a telephone); mulaw: 8-bit mu-law."""
    if codec in ("narrowband", "both"):
        audio = resample_poly(resample_poly(audio, 1, 2), 2, 1)[:len(audio)].astype(np.float32)
    if codec in ("mulaw", "both"):
        audio = mulaw(audio)
    return audio


def choose_muted(words: list, fraction: float, rng: np.random.Generator) -> list:
    """fraction x spoken words indices, sorted; the count is rounded up or down at random (3 words at 0.3: one
    word 90 % of the time), so that `fraction` of a dataset's words are muted, short lines included."""
    spoken = [k for k, w in enumerate(words) if w is not None]
    n = int(fraction * len(spoken) + rng.random())
    return sorted(int(k) for k in rng.choice(spoken, n, replace=False)) if n else []


def mute(audio: np.ndarray, sample_rate: int, words: list, muted: list) -> np.ndarray:
    """Zero the muted words' spans, with MUTE_FADE_S linear ramps just outside them."""
    gain, n = np.ones(len(audio), np.float32), np.arange(len(audio))
    for k in muted:
        first, last = round(words[k][0] * sample_rate), round(words[k][1] * sample_rate) - 1
        outside = np.maximum(first - n, n - last)                         # samples outside the span, <= 0 in it
        gain = np.minimum(gain, np.clip(outside / (MUTE_FADE_S * sample_rate), 0, 1))
    return audio * gain


def pink_noise(n: int, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    """Unit-power noise with a 1/f spectrum above 50 Hz (room and street hum rather than hiss)."""
    m = next_fast_len(n, real=True)                          # an FFT of a prime-ish length is 10x slower
    spectrum = rfft(rng.standard_normal(m)) / np.sqrt(np.maximum(rfftfreq(m, 1 / sample_rate), 50))
    noise = irfft(spectrum, m)[:n]
    return noise / np.sqrt(np.mean(noise ** 2))


def add_noise(audio: np.ndarray, sample_rate: int, snr_db: float | None, rng: np.random.Generator) -> np.ndarray:
    """Pink noise at snr_db below the audio's power over the whole file (None: clean); the sum is scaled down
    when it would clip, which keeps the SNR."""
    if snr_db is not None:
        power = np.mean(audio.astype(np.float64) ** 2)
        audio = audio + pink_noise(len(audio), sample_rate, rng) * np.sqrt(power / 10 ** (snr_db / 10))
    peak = np.max(np.abs(audio), initial=0)
    return (audio * (0.99 / peak if peak > 0.99 else 1)).astype(np.float32)


@dataclass(frozen=True)
class Reading:
    """A finished reading at SAMPLE_RATE: audio, word spans (seconds, None: not spoken), muted word indices."""
    audio: np.ndarray
    words: list
    muted: list


def read_aloud(engine: Espeak, text: str, style: ReadingStyle, snr_db: float | None, mute_fraction: float,
               mute_rng: np.random.Generator, noise_rng: np.random.Generator) -> Reading:
    """espeak-ng -> 16 kHz -> pauses -> room -> level -> muted words -> codec -> noise at snr_db."""
    speech = add_pauses(to_16k(engine.say(text, style.voice, style.rate, style.pitch, style.pitch_range,
                                          style.word_gap, style.seed)), style)
    audio = reverberate(speech.audio, SAMPLE_RATE, style)
    audio = audio * (style.level / max(np.max(np.abs(audio), initial=0), 1e-6))
    muted = choose_muted(speech.words, mute_fraction, mute_rng)
    audio = apply_codec(mute(audio, SAMPLE_RATE, speech.words, muted), style.codec)
    return Reading(add_noise(audio, SAMPLE_RATE, snr_db, noise_rng), speech.words, muted)

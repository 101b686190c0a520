"""The audio branch (arch.audio): a spoken reading of the line, encoded and fused with the visual frames before the
CTCtopB head, so that one model reads a line from its image, from its audio, or from both.

AudioEncoder: log-mel features computed in torch (htr.audio.log_mel, 10 ms frames), normalised per line, a
two-layer strided conv front-end (40 ms frames) and a BiLSTM. CrossModalFusion: every visual frame attends to the
audio frames (cross-attention, as in audio-visual speech recognition's fusion of lips and sound), both sides
carrying their relative position along the line, so attention can follow the reading order even where one side
carries nothing (an ink blot, a muted word); a residual feed-forward follows. A line without audio passes the
fusion unchanged; a line read from audio alone replaces its visual frames by one learned "no image" embedding.
Modality dropout (train.modality_dropout) decides per line in training which inputs the model sees.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from htr.audio import log_mel

HOP = 160                                      # log-mel hop: 10 ms at 16 kHz
MODES = ("image", "audio", "both")             # what a line is read from


def valid_frames(n: torch.Tensor, frames: int) -> torch.Tensor:
    """(B, frames) bool: True for the first n[b] frames of line b."""
    return torch.arange(frames, device=n.device)[None] < n[:, None]


class AudioEncoder(nn.Module):
    """(B, samples) waves at 16 kHz, zero-padded, with their lengths -> (B, Ta, dim) frames of 40 ms and the
    number of valid frames per line (B,)."""

    def __init__(self, dim: int, n_mels: int = 80, channels: int = 32, hidden: int = 96, layers: int = 1):
        super().__init__()
        self.n_mels = n_mels
        self.front = nn.ModuleList([nn.Conv2d(1, channels, 3, stride=2, padding=1),
                                    nn.Conv2d(channels, channels, 3, stride=2, padding=1)])
        self.project = nn.Linear(channels * math.ceil(math.ceil(n_mels / 2) / 2), 2 * hidden)
        self.rnn = nn.LSTM(2 * hidden, hidden, num_layers=layers, bidirectional=True, batch_first=True)
        self.out = nn.Linear(2 * hidden, dim)

    @staticmethod
    def normalise(mel: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Zero mean, unit variance per line over its valid frames (a recording's level and channel drop out);
        padding becomes 0. mel (B, n_mels, F), valid (B, F) bool."""
        w = valid[:, None, :].to(mel.dtype)                                     # (B, 1, F)
        n = (w.sum((1, 2)) * mel.shape[1]).clamp(min=1)[:, None, None]          # (B, 1, 1)
        mean = (mel * w).sum((1, 2), keepdim=True) / n
        std = (((mel - mean) * w) ** 2).sum((1, 2), keepdim=True).div(n).sqrt().clamp(min=1e-5)
        return (mel - mean) / std * w

    def forward(self, waves: torch.Tensor, lengths: torch.Tensor) -> tuple:
        mel = log_mel(waves.float(), n_mels=self.n_mels, hop=HOP)               # (B, n_mels, F)
        n = torch.where(lengths > 0, lengths // HOP + 1, 0)                     # (B,) valid mel frames
        y = self.normalise(mel, valid_frames(n, mel.shape[2])).unsqueeze(1)     # (B, 1, n_mels, F)
        for conv in self.front:                       # padding stays 0, as beyond the end of a line alone
            y = F.gelu(conv(y))                                                 # (B, c, n_mels/2, F/2), then /4
            n = (n + 1) // 2
            y = y * valid_frames(n, y.shape[3])[:, None, None].to(y.dtype)
        y = self.project(y.flatten(1, 2).transpose(1, 2))                       # (B, Ta, 2h)
        packed = pack_padded_sequence(y, n.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False)
        y = pad_packed_sequence(self.rnn(packed)[0], batch_first=True, total_length=y.shape[1])[0]  # (B, Ta, 2h)
        return self.out(y), n.to(y.device)                                      # (B, Ta, dim), (B,)


class RelativePosition(nn.Module):
    """Features of where a frame lies along its line, u in [0, 1] (sines and cosines of `n` frequencies, projected):
    the same u on the image and in the audio gets the same code."""

    def __init__(self, dim: int, n: int = 16):
        super().__init__()
        self.register_buffer("freqs", math.pi * torch.arange(1, n + 1).float(), persistent=False)
        self.project = nn.Linear(2 * n, dim)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        angles = u[..., None] * self.freqs                                      # (..., n)
        return self.project(torch.cat([angles.sin(), angles.cos()], -1))        # (..., dim)


class CrossModalFusion(nn.Module):
    """Visual frames (B, T, C) attend to audio frames (B, Ta, C): y = v + Attn(LN(v) + pos, LN(a) + pos, LN(a)),
    then y + FFN(LN(y)). image_on / audio_on (B,) bool say what each line is read from.

    A location prior (guided attention, as TTS aligners use it): head h adds -w_h (u_image - u_audio)^2 to its
    attention logits, w_h learned and starting from 10 to 316 over the heads, so a frame first listens where its
    relative position says the line is read and learns from there. Without it the reading stayed unused on the
    Hooker letters: 5 epochs with the loss of the lines read from their audio alone flat (docs/speech.md)."""

    def __init__(self, dim: int, heads: int = 4, dropout: float = 0.1):
        super().__init__()
        self.heads = heads
        self.log_width = nn.Parameter(torch.logspace(1, 2.5, heads).log())                    # (heads,)
        self.missing_image = nn.Parameter(torch.zeros(dim))
        self.position = RelativePosition(dim)
        self.norm_image, self.norm_audio, self.norm_ff = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.ff = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(2 * dim, dim))

    def forward(self, frames, audio, audio_frames, image_on, audio_on):
        B, T, _ = frames.shape
        Ta = audio.shape[1]
        v = torch.where(image_on[:, None, None], frames, self.missing_image.to(frames.dtype))   # (B, T, C)
        at = torch.arange(Ta, device=audio.device)[None]                                       # (1, Ta)
        u_image = (torch.arange(T, device=frames.device) + 0.5) / T                            # (T,)
        u_audio = (at + 0.5) / audio_frames[:, None].clamp(min=1)                             # (B, Ta)
        pad = (at >= audio_frames[:, None]) & (at > 0)     # (B, Ta) True = ignored; frame 0 kept: no empty softmax
        distance = u_image[None, :, None] - u_audio[:, None, :]                                # (B, T, Ta)
        bias = -self.log_width.exp()[None, :, None, None] * distance[:, None] ** 2             # (B, heads, T, Ta)
        bias = bias.masked_fill(pad[:, None, None, :], float("-inf")).reshape(B * self.heads, T, Ta)
        keys = self.norm_audio(audio)
        query = self.norm_image(v) + self.position(u_image).to(v.dtype)
        heard = self.attn(query, keys + self.position(u_audio).to(keys.dtype), keys, attn_mask=bias.to(query.dtype),
                          need_weights=False)[0]                                               # (B, T, C)
        y = v + heard
        y = y + self.ff(self.norm_ff(y))
        return torch.where(audio_on[:, None, None], y, v)                                      # (B, T, C)


def modality_masks(has_audio: torch.Tensor, mode: str = "both") -> tuple:
    """(image_on, audio_on) (B,) bool for reading every line from `mode` (MODES): 'both' and 'image' read the
    image; 'both' and 'audio' the audio of the lines that have it. 'audio' needs audio on every line."""
    if mode not in MODES:
        raise ValueError(f"modality must be one of {', '.join(MODES)}, got {mode!r}")
    image_on = torch.full_like(has_audio, mode != "audio")
    return image_on, has_audio & (mode != "image")


def modality_dropout(has_audio: torch.Tensor, image_only: float, audio_only: float) -> tuple:
    """Training's (image_on, audio_on): of the lines with audio, a share `image_only` is read from the image alone
    and a share `audio_only` from the audio alone, the rest from both (global torch RNG: resumed runs repeat it)."""
    r = torch.rand(has_audio.shape).to(has_audio.device)                                     # (B,)
    audio_on = has_audio & (r >= image_only)
    image_on = ~(has_audio & (r >= image_only) & (r < image_only + audio_only))
    return image_on, audio_on


def mix_names(image_on: torch.Tensor, audio_on: torch.Tensor) -> list:
    """Each line's mode (MODES), for logging the loss per modality mix."""
    return [MODES[2 if i and a else int(a)] for i, a in zip(image_on.tolist(), audio_on.tolist())]


def loss_per_mix(per_line: torch.Tensor, mixes: list) -> dict:
    """{'ctc_<mode>': mean loss of the lines read from that mode} for every mode, NaN where a batch has none (the
    log's columns stay the same from step to step)."""
    rows = {m: [k for k, x in enumerate(mixes) if x == m] for m in MODES}
    return {f"ctc_{m}": per_line[k].mean() if k else per_line.new_tensor(math.nan) for m, k in rows.items()}


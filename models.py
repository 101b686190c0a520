"""The recognizer: HybridBackbone (CNN + MobileViT) -> CTCtopB head (BiLSTM + CNN shortcut).

Shapes follow the default config: a (B, 1, 128, 1024) line image becomes (B, 256, 1, 128) features, i.e. 128
frames, and the head returns CTC logits (T=128, B, K) with class 0 the CTC blank, plus the frame features that
LLM-assisted training can tap (htr/llm_assist.py): the backbone output, the first and the last recurrent layer's.
"""
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from htr.audio_model import AudioEncoder, CrossModalFusion


def drop_path(x, p: float, training: bool):
    """Stochastic depth (Huang et al., 2016): each line's residual branch dropped with probability p in training, the
    kept ones scaled by 1 / (1 - p)."""
    if not training or p == 0:
        return x
    keep = x.new_empty(x.shape[0], *(1,) * (x.dim() - 1)).bernoulli_(1 - p)  # (B, 1, 1, 1)
    return x * keep / (1 - p)


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs with BatchNorm and a (projected) identity shortcut; the residual branch
    dropped per line with probability `drop` in training (stochastic depth)."""

    def __init__(self, in_ch: int, out_ch: int, drop: float = 0.0):
        super().__init__()
        self.drop = drop
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut = nn.Identity() if in_ch == out_ch else nn.Sequential(
            nn.Conv2d(in_ch, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = drop_path(self.bn2(self.conv2(y)), self.drop, self.training)
        return F.relu(y + self.shortcut(x))


def conv_bn_act(in_ch: int, out_ch: int, k: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, k, padding=k // 2, bias=False), nn.BatchNorm2d(out_ch), nn.SiLU())


class MobileViTBlock(nn.Module):
    """MobileViT block (Mehta & Rastegari, ICLR 2022).

    Local 3x3 conv + 1x1 projection to width d, unfold into p x p patches, a transformer that attends across the
    patches for each in-patch position (global receptive field), fold back, 1x1 projection to the input width,
    concatenate with the input and fuse with a 3x3 conv. H and W need not be multiples of p: the map is padded and
    the result cropped.
    """

    def __init__(self, channels: int, patch: int, dim: int, heads: int, depth: int, mlp_dim: int):
        super().__init__()
        self.patch = patch
        self.local = nn.Sequential(conv_bn_act(channels, channels, 3), nn.Conv2d(channels, dim, 1, bias=False))
        layer = nn.TransformerEncoderLayer(dim, heads, mlp_dim, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, depth, norm=nn.LayerNorm(dim), enable_nested_tensor=False)
        self.project = conv_bn_act(dim, channels, 1)
        self.fuse = conv_bn_act(2 * channels, channels, 3)

    def attend(self, y):
        """The transformer across patches. Training on the CPU runs it in fp32 even under bf16 autocast: PyTorch's
        CPU flash-attention backward is ~6x slower in bf16 than in fp32 here (torch 2.13; docs/benchmarks.md)."""
        if self.training and y.is_cpu and torch.is_autocast_enabled("cpu"):
            with torch.autocast("cpu", enabled=False):
                return self.transformer(y.float())
        return self.transformer(y)

    def forward(self, x):
        B, _, H, W = x.shape
        p = self.patch
        y = self.local(x)                                                  # (B, d, H, W)
        y = F.pad(y, (0, -W % p, 0, -H % p))                               # (B, d, Hp, Wp)
        d, Hp, Wp = y.shape[1], y.shape[2], y.shape[3]
        nh, nw = Hp // p, Wp // p
        y = y.reshape(B, d, nh, p, nw, p).permute(0, 3, 5, 2, 4, 1)        # (B, p, p, nh, nw, d)
        y = self.attend(y.reshape(B * p * p, nh * nw, d))                  # (B*p*p, N patches, d)
        y = y.reshape(B, p, p, nh, nw, d).permute(0, 5, 3, 1, 4, 2)        # (B, d, nh, p, nw, p)
        y = y.reshape(B, d, Hp, Wp)[:, :, :H, :W]                          # (B, d, H, W)
        return self.fuse(torch.cat([x, self.project(y)], dim=1))           # (B, C, H, W)


class HybridBackbone(nn.Module):
    """7x7 stem with stride [4, 2], then cnn_cfg tokens, then flattening over height.

    cnn_cfg tokens: [n, c] = n BasicBlocks of c channels; 'M' = 2x2 max-pool; 'Mh' = 2x1 max-pool (height only:
    twice the CTC frames of 'M', for small line images of long lines); 'mobilevit1' / 'mobilevit2' = a MobileViT
    block with patch 4 / 8 (settings in arch.mobilevit).
    """

    PATCH = {"mobilevit1": 4, "mobilevit2": 8}
    POOL = {"M": (2, 2), "Mh": (2, 1)}

    def __init__(self, cnn_cfg, mobilevit: dict, flattening: str = "maxpool", stem_channels: int = 32,
                 drop_rate: float = 0.0):
        super().__init__()
        if flattening not in ("maxpool", "avgpool"):
            raise ValueError(f"arch.flattening must be 'maxpool' or 'avgpool', got {flattening!r}")
        self.flattening = flattening
        layers = [nn.Conv2d(1, stem_channels, 7, stride=(4, 2), padding=3), nn.ReLU()]
        ch = stem_channels
        blocks = sum(t[0] for t in cnn_cfg if not isinstance(t, str) and len(t) == 2)
        drops = iter(torch.linspace(0, drop_rate, blocks).tolist())      # deeper blocks dropped more often (timm)
        for token in cnn_cfg:
            if isinstance(token, str) and token in self.POOL:
                layers.append(nn.MaxPool2d(self.POOL[token]))
            elif isinstance(token, str) and token in self.PATCH:
                layers.append(MobileViTBlock(ch, self.PATCH[token], **mobilevit))
            elif not isinstance(token, str) and len(token) == 2:
                n, out_ch = token
                for _ in range(n):
                    layers.append(BasicBlock(ch, out_ch, next(drops)))
                    ch = out_ch
            else:
                raise ValueError(f"arch.cnn_cfg: unknown token {token!r}; use [n, channels], 'M', 'Mh', "
                                 f"'mobilevit1' or 'mobilevit2'")
        self.features = nn.Sequential(*layers)
        self.out_channels = ch

    def forward(self, x):
        y = self.features(x)                                               # (B, C, H/16, W/8) by default
        return y.amax(2, keepdim=True) if self.flattening == "maxpool" else y.mean(2, keepdim=True)  # (B, C, 1, T)


def output_frames(cnn_cfg, width: int) -> int:
    """CTC frames T of a line `width` pixels wide: the stem's stride 2 (7x7, padding 3), then each pool's width
    stride (HybridBackbone.POOL: 2 for 'M', 1 for 'Mh')."""
    frames = (width - 1) // 2 + 1
    for token in cnn_cfg:
        if isinstance(token, str) and token in HybridBackbone.POOL:
            frames //= HybridBackbone.POOL[token][1]
    return frames


class CTCOutput(NamedTuple):
    logits: torch.Tensor                  # (T, B, K) main CTC logits
    shortcut: Optional[torch.Tensor]      # (T, B, K) CNN-shortcut CTC logits ('both' only)
    features: dict                        # tap name -> (B, T, C) frame features, each the very tensor the CTC
                                          # path reads (a hook on it sees the whole gradient): 'backbone' (C = the
                                          # backbone's channels), 'rnn1' and 'rnn_last' (C = 2 * hidden; recurrent
                                          # heads only)
    audio: Optional[tuple] = None         # with the audio branch: (logits (Ta, B, K) of the audio CTC shortcut,
                                          # valid audio frames (B,)), for its auxiliary loss


class CTCtopB(nn.Module):
    """CTC head. 'both': recurrent stack + 1x3 conv shortcut; 'rnn': recurrent only; 'cnn': 1x3 conv only.

    The first recurrent layer is its own module so its output can be tapped for the LLM connector.
    """

    TAPS = ("backbone", "rnn1", "rnn_last")

    def __init__(self, in_ch: int, n_classes: int, head_type: str = "both", rnn_type: str = "lstm",
                 rnn_layers: int = 3, rnn_hidden_size: int = 256, dropout: float = 0.2):
        super().__init__()
        if head_type not in ("both", "rnn", "cnn"):
            raise ValueError(f"arch.head_type must be 'both', 'rnn' or 'cnn', got {head_type!r}")
        self.head_type = head_type
        if head_type != "rnn":
            self.shortcut = nn.Conv2d(in_ch, n_classes, (1, 3), padding=(0, 1))
        if head_type == "cnn":
            return
        rnn = {"lstm": nn.LSTM, "gru": nn.GRU}.get(rnn_type)
        if rnn is None:
            raise ValueError(f"arch.rnn_type must be 'lstm' or 'gru', got {rnn_type!r}")
        h = rnn_hidden_size
        self.rnn1 = rnn(in_ch, h, bidirectional=True)
        self.rnn_rest = rnn(2 * h, h, num_layers=rnn_layers - 1, bidirectional=True,
                            dropout=dropout if rnn_layers > 2 else 0.0) if rnn_layers > 1 else None
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Sequential(nn.LayerNorm(2 * h), nn.Linear(2 * h, 2 * h), nn.GELU(), nn.Linear(2 * h, n_classes))

    def feature_dims(self, in_ch: int) -> dict:
        """Tap name -> feature width C, for the taps this head has."""
        if self.head_type == "cnn":
            return {"backbone": in_ch}
        return {"backbone": in_ch, "rnn1": 2 * self.rnn1.hidden_size, "rnn_last": 2 * self.rnn1.hidden_size}

    def forward(self, x) -> CTCOutput:
        frames = x.squeeze(2).transpose(1, 2)                              # (B, T, C)
        features = {"backbone": frames}
        short = None
        if self.head_type != "rnn":
            short = self.shortcut(frames.transpose(1, 2).unsqueeze(2)).squeeze(2).permute(2, 0, 1)   # (T, B, K)
        if self.head_type == "cnn":
            return CTCOutput(short, None, features)
        y1 = self.rnn1(frames.transpose(0, 1))[0].transpose(0, 1)          # (B, T, 2h)
        y = y1
        if self.rnn_rest is not None:
            y = self.rnn_rest(self.dropout(y1.transpose(0, 1)))[0].transpose(0, 1)                   # (B, T, 2h)
        features.update(rnn1=y1, rnn_last=y)
        logits = self.fc(y.transpose(0, 1))                                # (T, B, K)
        return CTCOutput(logits, short, features)


AUDIO_MODULES = ("audio_encoder.", "fusion.", "audio_shortcut.")  # state-dict prefixes of the audio branch


class HTRNet(nn.Module):
    """HybridBackbone (+ AudioEncoder and CrossModalFusion with arch.audio.enabled) + CTCtopB: (B, 1, H, W) line
    images, and optionally their readings (dataset.AudioBatch), -> CTCOutput. Without arch.audio.enabled the model
    has no audio modules at all: its weights are exactly those of a model built before the audio branch existed."""

    def __init__(self, arch, n_classes: int, drop_path: float = 0.0):
        super().__init__()
        self.backbone = HybridBackbone(arch.cnn_cfg, dict(arch.mobilevit), arch.flattening, arch.stem_channels,
                                       drop_path)
        width = self.backbone.out_channels
        audio = arch.get("audio")
        if audio is not None and audio.enabled:
            self.audio_encoder = AudioEncoder(width, audio.n_mels, audio.channels, audio.hidden, audio.layers)
            self.fusion = CrossModalFusion(width, audio.heads, audio.dropout)
            self.audio_shortcut = nn.Linear(width, n_classes)            # CTC from the audio frames alone
        self.head = CTCtopB(width, n_classes, arch.head_type, arch.rnn_type, arch.rnn_layers, arch.rnn_hidden_size,
                            arch.rnn_dropout)

    @property
    def has_audio(self) -> bool:
        return hasattr(self, "fusion")

    def forward(self, x, audio=None, image_on=None, audio_on=None) -> CTCOutput:
        """audio: dataset.AudioBatch or None; image_on / audio_on (B,) bool (htr.audio_model.modality_masks),
        default: the image of every line and the audio of those that have it."""
        feats = self.backbone(x)                                           # (B, C, 1, T)
        if audio is None or not self.has_audio:
            return self.head(feats)
        heard, n = self.audio_encoder(audio.waves.to(feats.device), audio.lengths.to(feats.device))  # (B, Ta, C)
        out = self.head(self.fuse(feats, heard, n, audio.lengths.to(feats.device) > 0, image_on, audio_on))
        return out._replace(audio=(self.audio_shortcut(heard).transpose(0, 1), n))   # (Ta, B, K)

    def fuse(self, feats, heard, n, has, image_on=None, audio_on=None):
        """Visual features (B, C, 1, T) fused with the audio frames heard (B, Ta, C), n of them valid per line,
        for the lines that `has` a reading -> (B, C, 1, T)."""
        image_on = torch.ones_like(has) if image_on is None else image_on.to(feats.device)
        audio_on = has if audio_on is None else audio_on.to(feats.device) & has
        frames = feats.squeeze(2).transpose(1, 2)                          # (B, T, C)
        fused = self.fusion(frames, heard.to(frames.dtype), n, image_on, audio_on)
        return fused.transpose(1, 2).unsqueeze(2)                          # (B, C, 1, T)

    def tap_width(self, tap: str) -> int:
        """Width C of the (B, T, C) features `tap` (train.llm_tap); ValueError naming the taps this head has."""
        dims = self.head.feature_dims(self.backbone.out_channels)
        if tap not in dims:
            raise ValueError(f"train.llm_tap={tap!r} does not exist for arch.head_type={self.head.head_type}: use "
                             f"one of {', '.join(dims)}")
        return dims[tap]

    def class_layers(self) -> list:
        """State-dict prefixes of the layers with one output row per class (the CTC blank first)."""
        return (["head.fc.3"] if self.head.head_type != "cnn" else []) + \
            (["head.shortcut"] if self.head.head_type != "rnn" else []) + (["audio_shortcut"] if self.has_audio else [])

    def mismatched(self, state: dict, skip=()) -> list:
        """Keys present in only one of `state` and this model's state_dict, or whose shapes differ (shapes are not
        compared for the keys in `skip`)."""
        own = self.state_dict()
        return sorted((own.keys() ^ state.keys()) |
                      {k for k in (own.keys() & state.keys()) - set(skip) if own[k].shape != state[k].shape})

    def load_resized(self, state: dict, old_chars: str, new_chars: str) -> None:
        """Load the weights of a model with another character set (kraken's --resize): the class rows of the blank
        and of the characters both sets share are copied, new characters keep their fresh initialisation; the
        weights of an image-only model leave this model's audio branch fresh. ValueError names the tensors that
        differ otherwise (another architecture)."""
        own = self.state_dict()
        classes = {k for k in own if k.rsplit(".", 1)[0] in self.class_layers()}
        fresh = set() if any(k.startswith(AUDIO_MODULES) for k in state) else \
            {k for k in own if k.startswith(AUDIO_MODULES)}              # an image model gets the audio branch
        differ = sorted(set(self.mismatched(state, skip=classes)) - fresh)
        if differ:
            raise ValueError(f"tensors missing or of another shape: {', '.join(differ[:8])}"
                             + (f" and {len(differ) - 8} more" if len(differ) > 8 else ""))
        pairs = [(0, 0)] + [(i + 1, old_chars.index(c) + 1) for i, c in enumerate(new_chars) if c in old_chars]
        new_rows, old_rows = (torch.tensor(rows) for rows in zip(*pairs))
        for key in set(own) - fresh:
            if key in classes:
                own[key][new_rows] = state[key][old_rows].to(own[key].dtype)
            else:
                own[key] = state[key]
        self.load_state_dict(own)


def ctc_loss(logits: torch.Tensor, targets, target_lengths, per_line: bool = False,
             input_lengths=None) -> torch.Tensor:
    """CTC (sum over the batch, zero_infinity) / batch size, always in fp32; per_line: the (B,) losses themselves.
    logits (T, B, K); input_lengths (B,): the valid frames of each line (default: all T)."""
    T, B, _ = logits.shape
    log_probs = logits.float().log_softmax(2)                              # (T, B, K)
    input_lengths = torch.full((B,), T, dtype=torch.long) if input_lengths is None else input_lengths.cpu()
    lines = F.ctc_loss(log_probs, targets, input_lengths, target_lengths, reduction="none", zero_infinity=True)
    return lines if per_line else lines.sum() / B


def audio_ctc_loss(logits: torch.Tensor, frames: torch.Tensor, targets, target_lengths) -> torch.Tensor:
    """The audio CTC shortcut's loss: CTC over the valid audio frames (Ta, B, K), summed per line, averaged over the
    lines that have a reading (lines without one add nothing). It teaches the audio encoder from every reading,
    whatever modality dropout chose (which reads only a quarter of them from the audio alone)."""
    has = frames > 0
    lines = ctc_loss(logits, targets, target_lengths, per_line=True, input_lengths=frames.clamp(min=1))   # (B,)
    return (lines * has.to(lines.device)).sum() / has.sum().clamp(min=1)


def fuse_conv_bn(model: nn.Module) -> nn.Module:
    """Inference only: fold every BatchNorm2d into the Conv2d registered just before it (BasicBlock, conv_bn_act).
    Same outputs up to rounding, one pass over memory less per conv (~20% faster eval on CPU)."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval
    for module in model.modules():
        names = list(module._modules)
        for conv, bn in zip(names, names[1:]):
            if isinstance(module._modules[conv], nn.Conv2d) and isinstance(module._modules[bn], nn.BatchNorm2d):
                module._modules[conv] = fuse_conv_bn_eval(module._modules[conv], module._modules[bn])
                module._modules[bn] = nn.Identity()
    return model


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def parameter_report(model: HTRNet) -> dict:
    """Parameter counts per module (the audio branch's when it has one), for the start-of-training log and the
    benchmark."""
    audio = {"audio": sum(count_parameters(m) for m in (model.audio_encoder, model.fusion, model.audio_shortcut))} \
        if model.has_audio else {}
    return {"backbone": count_parameters(model.backbone), "head": count_parameters(model.head), **audio,
            "total": count_parameters(model)}

"""The recognizer and the LLM path of training.

HybridBackbone (CNN + MobileViT) -> CTCtopB head (BiLSTM + CNN shortcut). Shapes follow the default config: a
(B, 1, 128, 1024) line image becomes (B, 256, 1, 128) features, i.e. 128 frames, and the head returns CTC logits
(T=128, B, K) with class 0 the CTC blank.

LLM-assisted training (train.use_llm): for a sampled subset of the batch, the features tapped after the first BiLSTM
layer, (B, T=128, 512), are compressed by a QFormerConnector into `num_queries` prefix embeddings in the LLM's
embedding space. The FrozenCausalLM reads

    [BOS] [prompt tokens] [visual prefix x Q] [transcription tokens] [EOS] [pad ...]

and is teacher-forced on the transcription: labels are the text ids and EOS, -100 everywhere else (HF shifts them
internally, so the last prefix position predicts the first text token). The loss gradient trains the connector (and
LoRA, if enabled) and flows back into the recognizer's features; the LLM's own weights never change and never enter
a checkpoint: a state_dict hook on FrozenCausalLM drops every frozen tensor. At inference the LLM is not loaded, and
transformers / peft are imported only inside the LLM classes, so the LLM-off path never imports them.
"""
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs with BatchNorm and a (projected) identity shortcut."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut = nn.Identity() if in_ch == out_ch else nn.Sequential(
            nn.Conv2d(in_ch, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
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
        CPU flash-attention backward is ~6x slower in bf16 than in fp32 here (torch 2.13; README, Benchmarks)."""
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

    def __init__(self, cnn_cfg, mobilevit: dict, flattening: str = "maxpool", stem_channels: int = 32):
        super().__init__()
        if flattening not in ("maxpool", "avgpool"):
            raise ValueError(f"arch.flattening must be 'maxpool' or 'avgpool', got {flattening!r}")
        self.flattening = flattening
        layers = [nn.Conv2d(1, stem_channels, 7, stride=(4, 2), padding=3), nn.ReLU()]
        ch = stem_channels
        for token in cnn_cfg:
            if isinstance(token, str) and token in self.POOL:
                layers.append(nn.MaxPool2d(self.POOL[token]))
            elif isinstance(token, str) and token in self.PATCH:
                layers.append(MobileViTBlock(ch, self.PATCH[token], **mobilevit))
            elif not isinstance(token, str) and len(token) == 2:
                n, out_ch = token
                for _ in range(n):
                    layers.append(BasicBlock(ch, out_ch))
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
    rnn1: Optional[torch.Tensor]          # (B, T, 2*hidden) first recurrent layer's output, for the LLM path


class CTCtopB(nn.Module):
    """CTC head. 'both': recurrent stack + 1x3 conv shortcut; 'rnn': recurrent only; 'cnn': 1x3 conv only.

    The first recurrent layer is its own module so its output can be tapped for the LLM connector.
    """

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

    def forward(self, x) -> CTCOutput:
        short = self.shortcut(x).squeeze(2).permute(2, 0, 1) if self.head_type != "rnn" else None   # (T, B, K)
        if self.head_type == "cnn":
            return CTCOutput(short, None, None)
        seq = x.squeeze(2).permute(2, 0, 1)                                # (T, B, C)
        y1, _ = self.rnn1(seq)                                             # (T, B, 2h)
        y = y1
        if self.rnn_rest is not None:
            y, _ = self.rnn_rest(self.dropout(y1))                         # (T, B, 2h)
        logits = self.fc(y)                                                # (T, B, K)
        return CTCOutput(logits, short, y1.transpose(0, 1))


class HTRNet(nn.Module):
    """HybridBackbone + CTCtopB: (B, 1, H, W) line images -> CTCOutput."""

    def __init__(self, arch, n_classes: int):
        super().__init__()
        self.backbone = HybridBackbone(arch.cnn_cfg, dict(arch.mobilevit), arch.flattening, arch.stem_channels)
        self.head = CTCtopB(self.backbone.out_channels, n_classes, arch.head_type, arch.rnn_type,
                            arch.rnn_layers, arch.rnn_hidden_size, arch.rnn_dropout)

    def forward(self, x) -> CTCOutput:
        return self.head(self.backbone(x))

    def class_layers(self) -> list:
        """State-dict prefixes of the layers with one output row per class (the CTC blank first)."""
        return (["head.fc.3"] if self.head.head_type != "cnn" else []) + \
            (["head.shortcut"] if self.head.head_type != "rnn" else [])

    def mismatched(self, state: dict, skip=()) -> list:
        """Keys present in only one of `state` and this model's state_dict, or whose shapes differ (shapes are not
        compared for the keys in `skip`)."""
        own = self.state_dict()
        return sorted((own.keys() ^ state.keys()) |
                      {k for k in (own.keys() & state.keys()) - set(skip) if own[k].shape != state[k].shape})

    def load_resized(self, state: dict, old_chars: str, new_chars: str) -> None:
        """Load the weights of a model with another character set (kraken's --resize): the class rows of the blank
        and of the characters both sets share are copied, new characters keep their fresh initialisation.
        ValueError names the tensors that differ otherwise (another architecture)."""
        own = self.state_dict()
        classes = {k for k in own if k.rsplit(".", 1)[0] in self.class_layers()}
        differ = self.mismatched(state, skip=classes)
        if differ:
            raise ValueError(f"tensors missing or of another shape: {', '.join(differ[:8])}"
                             + (f" and {len(differ) - 8} more" if len(differ) > 8 else ""))
        pairs = [(0, 0)] + [(i + 1, old_chars.index(c) + 1) for i, c in enumerate(new_chars) if c in old_chars]
        new_rows, old_rows = (torch.tensor(rows) for rows in zip(*pairs))
        for key in own:
            if key in classes:
                own[key][new_rows] = state[key][old_rows].to(own[key].dtype)
            else:
                own[key] = state[key]
        self.load_state_dict(own)


def ctc_loss(logits: torch.Tensor, targets, target_lengths) -> torch.Tensor:
    """CTC (sum over the batch, zero_infinity) / batch size, always in fp32. logits (T, B, K)."""
    T, B, _ = logits.shape
    log_probs = logits.float().log_softmax(2)                              # (T, B, K)
    input_lengths = torch.full((B,), T, dtype=torch.long)
    return F.ctc_loss(log_probs, targets, input_lengths, target_lengths, reduction="sum", zero_infinity=True) / B


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
    """Parameter counts per module, for the start-of-training log and the benchmark."""
    return {"backbone": count_parameters(model.backbone), "head": count_parameters(model.head),
            "total": count_parameters(model)}


# ------------------------------------------------------------------------------------------------------------- LLM path

IGNORE = -100  # label ignored by the cross-entropy


class LLMLoadError(RuntimeError):
    """The language model named by `llm.name` could not be loaded."""


class QFormerConnector(nn.Module):
    """Learned queries cross-attend to the frames, then an MLP maps them into the LLM embedding space."""

    def __init__(self, llm_hidden: int, feat_dim: int = 512, num_queries: int = 64, num_layers: int = 2,
                 hidden: int = 512, num_heads: int = 8, intermediate: int = 1024, proj_hidden: int = 1024):
        super().__init__()
        from transformers import Blip2QFormerConfig, Blip2QFormerModel
        config = Blip2QFormerConfig(hidden_size=hidden, num_hidden_layers=num_layers, num_attention_heads=num_heads,
                                    intermediate_size=intermediate, cross_attention_frequency=1,
                                    encoder_hidden_size=feat_dim)
        self.queries = nn.Parameter(torch.randn(1, num_queries, hidden) * config.initializer_range)
        self.qformer = Blip2QFormerModel(config)
        self.proj = nn.Sequential(nn.Linear(hidden, proj_hidden), nn.GELU(), nn.Linear(proj_hidden, llm_hidden))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        queries = self.queries.expand(feats.shape[0], -1, -1)  # (B, Q, 512)
        out = self.qformer(query_embeds=queries, encoder_hidden_states=feats)  # cross-attends to (B, T, 512)
        return self.proj(out.last_hidden_state)  # (B, Q, 512) -> (B, Q, H)


@dataclass
class LMBatch:
    input_ids: torch.Tensor       # (B, L) token ids; the prefix slots hold pad ids, their embeddings get replaced
    labels: torch.Tensor          # (B, L) text ids and EOS, IGNORE elsewhere (unshifted: HF shifts internally)
    attention_mask: torch.Tensor  # (B, L) 1 on real positions, 0 on right padding
    prefix_start: int             # the visual prefix occupies [prefix_start, prefix_start + num_prefix)

    def to(self, device) -> "LMBatch":
        return LMBatch(self.input_ids.to(device), self.labels.to(device), self.attention_mask.to(device),
                       self.prefix_start)


def build_lm_batch(text_ids: list[list[int]], num_prefix: int, bos_id: int | None, eos_id: int, pad_id: int,
                   prompt_ids: list[int] = ()) -> LMBatch:
    """[BOS] + prompt + prefix placeholders + text + EOS per row, right-padded; only text and EOS are labelled."""
    head = ([] if bos_id is None else [bos_id]) + list(prompt_ids)
    text_start = len(head) + num_prefix
    rows = [head + [pad_id] * num_prefix + ids + [eos_id] for ids in text_ids]
    shape = (len(rows), max(map(len, rows)))
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE, dtype=torch.long)
    attention_mask = torch.zeros(shape, dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, :len(row)] = torch.tensor(row)
        labels[i, text_start:len(row)] = torch.tensor(row[text_start:])
        attention_mask[i, :len(row)] = 1
    return LMBatch(input_ids, labels, attention_mask, len(head))


def _load_help(name: str) -> str:
    return (f"Fix one of: (a) a hub model: accept its licence on https://huggingface.co/{name} if gated (e.g. "
            f"meta-llama/Llama-3.2-3B), then `huggingface-cli download {name}` (or `hf download {name}`) where the "
            f"hub is reachable; (b) a local directory: `python prepare_llm.py smollm2 llm/smollm2` (SmolLM2-135M, "
            f"Apache-2.0) and set llm.name=llm/smollm2; (c) set train.use_llm=false.")


def _looks_local(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or name.count("/") > 1


def _drop_frozen(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    """state_dict post-hook: keep only the trainable (LoRA) tensors of the LLM, never its frozen weights/buffers."""
    keep = {prefix + n for n, p in module.named_parameters() if p.requires_grad}
    for key in [k for k in state_dict if k.startswith(prefix) and k not in keep]:
        del state_dict[key]


def _bnb_4bit_config(name: str):
    from transformers import BitsAndBytesConfig
    if not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None:
        raise LLMLoadError(f"llm.qlora=true (4-bit {name!r}) needs CUDA and the bitsandbytes package "
                           f"(`pip install bitsandbytes`); set llm.qlora=false to load it in bf16/fp32")
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)


class FrozenCausalLM(nn.Module):
    """A Hugging Face causal LM + tokenizer with frozen weights, pinned to eval mode (LoRA dropout excepted)."""

    def __init__(self, name: str, device: torch.device, gguf_file: str | None = None,
                 attn_implementation: str | None = None, load_in_4bit: bool = False,
                 dtype: torch.dtype | None = None):
        super().__init__()
        self.name = name
        device = torch.device(device)
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        self.tokenizer, self.model = self._load(name, device, dtype, gguf_file, attn_implementation, load_in_4bit)
        self.model.requires_grad_(False)
        tok = self.tokenizer
        if tok.eos_token_id is None:
            raise LLMLoadError(f"llm.name={name!r}: its tokenizer has no EOS token, which the LLM loss needs")
        self.bos_id = tok.bos_token_id  # None for e.g. Qwen2 (trained without BOS); GPT-2's is <|endoftext|> = EOS
        self.eos_id = tok.eos_token_id
        self.pad_id = tok.eos_token_id if tok.pad_token_id is None else tok.pad_token_id  # pads are masked anyway
        self.token_ids: dict[str, list[int]] = {}                      # each distinct text is tokenised once
        self.register_state_dict_post_hook(_drop_frozen)
        self.train(False)

    @staticmethod
    def _load(name, device, dtype, gguf_file, attn_implementation, load_in_4bit):
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
        if _looks_local(name) and not Path(name).expanduser().is_dir():
            raise LLMLoadError(f"llm.name={name!r} is not an existing directory: create it with `python prepare_llm.py "
                               f"smollm2 {name}`, or point llm.name at a saved model directory or a hub id")
        kwargs = dict(dtype=dtype, device_map={"": device})
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        if gguf_file:  # dequantized to dense weights: packed GGUF layers are not meant for backprop
            kwargs.update(gguf_file=gguf_file, quantization_config=GgufConfig(dequantize=True))
        if load_in_4bit:
            kwargs["quantization_config"] = _bnb_4bit_config(name)
        try:
            tokenizer = AutoTokenizer.from_pretrained(name, gguf_file=gguf_file)
            model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
        except (OSError, ValueError, ImportError) as e:
            reason = (str(e).strip() or type(e).__name__).splitlines()[0][:300]
            raise LLMLoadError(f"cannot load llm.name={name!r}: {reason}\n{_load_help(name)}") from None
        return tokenizer, model

    def add_lora(self, r: int = 8, alpha: int = 16, dropout: float = 0.05,
                 target_modules: list[str] | None = None) -> None:
        """Wrap the LLM with trainable LoRA adapters (peft picks the usual targets when target_modules is None)."""
        from peft import LoraConfig, get_peft_model
        config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, task_type="CAUSAL_LM",
                            target_modules=None if target_modules is None else list(target_modules))
        self.model = get_peft_model(self.model, config)
        self.train(self.training)

    def train(self, mode: bool = True) -> "FrozenCausalLM":
        super().train(False)  # the frozen LLM never runs dropout; only LoRA dropout follows `mode`
        for name, module in self.model.named_modules():
            if name.endswith("lora_dropout"):
                module.train(mode)
        self.training = mode
        return self

    @property
    def hidden_size(self) -> int:
        return self.model.get_input_embeddings().embedding_dim

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    def encode(self, texts: list[str]) -> list[list[int]]:
        for text in set(texts) - self.token_ids.keys():
            self.token_ids[text] = self.tokenizer(text, add_special_tokens=False).input_ids
        return [self.token_ids[t] for t in texts]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(input_ids)  # (B, L) -> (B, L, H)

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                first_label: int = 1) -> torch.Tensor:
        """Mean cross-entropy of the labelled tokens (labels unshifted, IGNORE elsewhere, none before
        `first_label`). The LM head runs only from the position before the first label on: its vocabulary-wide
        projection is skipped for the prompt and the visual prefix."""
        keep = torch.arange(first_label - 1, labels.shape[1] - 1, device=labels.device)    # (k,)
        logits = self.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, logits_to_keep=keep,
                            use_cache=False).logits                                       # (B, k, V)
        return F.cross_entropy(logits.float().flatten(0, 1), labels[:, keep + 1].flatten(), ignore_index=IGNORE)


class LLMAssist(nn.Module):
    """Auxiliary loss: Q-Former prefix from recognizer features, frozen LLM teacher-forced on the transcription."""

    def __init__(self, connector: QFormerConnector, lm: FrozenCausalLM, prompt: str | None = None):
        super().__init__()
        self.connector = connector
        self.lm = lm
        self.prompt_ids = lm.encode([prompt])[0] if prompt else []

    def forward(self, feats: torch.Tensor, texts: list[str]) -> torch.Tensor:
        prefix = self.connector(feats).to(self.lm.dtype)  # (B, T, 512) -> (B, Q, H)
        batch = build_lm_batch(self.lm.encode(texts), prefix.shape[1], self.lm.bos_id, self.lm.eos_id,
                               self.lm.pad_id, self.prompt_ids).to(feats.device)
        embeds = self.lm.embed(batch.input_ids)  # (B, L, H)
        start, end = batch.prefix_start, batch.prefix_start + prefix.shape[1]
        embeds = torch.cat([embeds[:, :start], prefix, embeds[:, end:]], dim=1)  # (B, L, H)
        return self.lm(embeds, batch.attention_mask, batch.labels, first_label=end)

    @staticmethod
    def sample_indices(batch_size: int, ratio: float, generator: torch.Generator | None = None) -> torch.Tensor:
        """Sorted random subset of max(1, round(B * ratio)) batch indices (none when ratio <= 0)."""
        if ratio <= 0 or batch_size == 0:
            return torch.zeros(0, dtype=torch.long)
        count = min(batch_size, max(1, round(batch_size * ratio)))
        return torch.randperm(batch_size, generator=generator)[:count].sort().values

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Connector + LoRA weights as plain CPU tensors (the frozen LLM is reloaded from llm.name instead)."""
        return {k: v.detach().cpu() for k, v in self.state_dict().items()}

    def load_trainable_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        expected = set(self.state_dict())
        if set(state_dict) != expected:
            raise ValueError(f"LLM-assist checkpoint mismatch: missing {sorted(expected - set(state_dict))[:5]}, "
                             f"unexpected {sorted(set(state_dict) - expected)[:5]} (same llm.* config as training?)")
        self.load_state_dict(state_dict, strict=False)  # strict=False: the frozen LLM weights are not in it


def llm_dtype(setting: str, device: torch.device) -> torch.dtype:
    """llm.dtype: auto = bf16 where the device computes it natively (CUDA, CPUs with AMX / AVX512-BF16), else fp32."""
    from utils import native_bf16
    if setting == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
    if setting not in dtypes:
        raise LLMLoadError(f"llm.dtype must be auto, bf16 or fp32, got {setting!r}")
    return dtypes[setting]


def build_llm_assist(cfg, device, feat_dim: int = 512) -> LLMAssist:
    """From the `llm` config node (OmegaConf or dict); absent optional keys take the defaults below.
    feat_dim is the width of the tapped features: 2 * arch.rnn_hidden_size."""
    device = torch.device(device)
    attn = cfg.get("attn_implementation") or ("eager" if device.type == "cpu" else None)
    lm = FrozenCausalLM(cfg.get("name", "meta-llama/Llama-3.2-3B"), device, gguf_file=cfg.get("gguf_file"),
                        attn_implementation=attn, load_in_4bit=cfg.get("qlora", False),
                        dtype=llm_dtype(cfg.get("dtype", "auto"), device))
    lora = cfg.get("lora") or {}
    if lora.get("enabled", False):
        lm.add_lora(r=lora.get("r", 8), alpha=lora.get("alpha", 16), dropout=lora.get("dropout", 0.05),
                    target_modules=lora.get("target_modules"))
    if cfg.get("compile", False):  # inductor fuses the norms, rotary and activations between the matmuls
        from utils import require_cpp_compiler
        require_cpp_compiler(device, "llm.compile=true", "set llm.compile=false")
        lm.model.compile(dynamic=True)
    connector = QFormerConnector(lm.hidden_size, feat_dim, num_queries=cfg.get("num_queries", 64),
                                 num_layers=cfg.get("qformer_layers", 2)).to(device)
    return LLMAssist(connector, lm, prompt=cfg.get("prompt"))

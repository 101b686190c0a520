"""
LLM-assisted training: an auxiliary loss from a frozen causal language model.

For a sampled subset of the batch, the features tapped after the first BiLSTM layer, (B, T=128, 512), are
compressed by a Q-Former into `num_queries` visual prefix embeddings in the LLM's embedding space. The LLM reads

    [BOS] [prompt tokens] [visual prefix x Q] [transcription tokens] [EOS] [pad ...]

and is teacher-forced on the transcription: labels are the text ids and EOS, -100 everywhere else (HF shifts them
internally, so the last prefix position predicts the first text token). The loss gradient trains the
connector (and LoRA, if enabled) and flows back into the recognizer's features; the LLM's own weights never change
and never enter a checkpoint: a state_dict hook on FrozenCausalLM drops every frozen tensor, so the state_dict of
any module holding it (LLMAssist, or a parent) contains only connector + LoRA weights. At inference the LLM is not
loaded at all. This file is imported lazily, only when train.use_llm is true.
"""
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from transformers import (AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, Blip2QFormerConfig,
                          Blip2QFormerModel, GgufConfig)

IGNORE = -100  # label ignored by the cross-entropy


class LLMLoadError(RuntimeError):
    """The language model named by `llm.name` could not be loaded."""


# ---------------------------------------------------------------------------------------------------------------
# connector


class QFormerConnector(nn.Module):
    """Learned queries cross-attend to the frames, then an MLP maps them into the LLM embedding space."""

    def __init__(self, llm_hidden: int, feat_dim: int = 512, num_queries: int = 64, num_layers: int = 2,
                 hidden: int = 512, num_heads: int = 8, intermediate: int = 1024, proj_hidden: int = 1024):
        super().__init__()
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


# ---------------------------------------------------------------------------------------------------------------
# sequence construction (pure, no model needed)


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


# ---------------------------------------------------------------------------------------------------------------
# frozen language model


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


def _bnb_4bit_config(name: str) -> BitsAndBytesConfig:
    if not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None:
        raise LLMLoadError(f"llm.qlora=true (4-bit {name!r}) needs CUDA and the bitsandbytes package "
                           f"(`pip install bitsandbytes`); set llm.qlora=false to load it in bf16/fp32")
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)


class FrozenCausalLM(nn.Module):
    """A Hugging Face causal LM + tokenizer with frozen weights, pinned to eval mode (LoRA dropout excepted)."""

    def __init__(self, name: str, device: torch.device, gguf_file: str | None = None,
                 attn_implementation: str | None = None, load_in_4bit: bool = False):
        super().__init__()
        self.name = name
        self.tokenizer, self.model = self._load(name, torch.device(device), gguf_file, attn_implementation,
                                                load_in_4bit)
        self.model.requires_grad_(False)
        tok = self.tokenizer
        if tok.eos_token_id is None:
            raise LLMLoadError(f"llm.name={name!r}: its tokenizer has no EOS token, which the LLM loss needs")
        self.bos_id = tok.bos_token_id  # None for e.g. Qwen2 (trained without BOS); GPT-2's is <|endoftext|> = EOS
        self.eos_id = tok.eos_token_id
        self.pad_id = tok.eos_token_id if tok.pad_token_id is None else tok.pad_token_id  # pads are masked anyway
        self.register_state_dict_post_hook(_drop_frozen)
        self.train(False)

    @staticmethod
    def _load(name, device, gguf_file, attn_implementation, load_in_4bit):
        if _looks_local(name) and not Path(name).expanduser().is_dir():
            raise LLMLoadError(f"llm.name={name!r} is not an existing directory: create it with `python prepare_llm.py "
                               f"smollm2 {name}`, or point llm.name at a saved model directory or a hub id")
        kwargs = dict(dtype=torch.bfloat16 if device.type == "cuda" else torch.float32, device_map={"": device})
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
        return [self.tokenizer(t, add_special_tokens=False).input_ids for t in texts]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(input_ids)  # (B, L) -> (B, L, H)

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor) -> torch.Tensor:
        out = self.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels, use_cache=False)
        return out.loss  # mean token cross-entropy over labelled positions


# ---------------------------------------------------------------------------------------------------------------
# connector + frozen LLM


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
        return self.lm(embeds, batch.attention_mask, batch.labels)

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


def build_llm_assist(cfg, device, feat_dim: int = 512) -> LLMAssist:
    """From the `llm` config node (OmegaConf or dict); absent optional keys take the defaults below.
    feat_dim is the width of the tapped features: 2 * arch.rnn_hidden_size."""
    device = torch.device(device)
    lm = FrozenCausalLM(cfg.get("name", "meta-llama/Llama-3.2-3B"), device, gguf_file=cfg.get("gguf_file"),
                        attn_implementation=cfg.get("attn_implementation"), load_in_4bit=cfg.get("qlora", False))
    lora = cfg.get("lora") or {}
    if lora.get("enabled", False):
        lm.add_lora(r=lora.get("r", 8), alpha=lora.get("alpha", 16), dropout=lora.get("dropout", 0.05),
                    target_modules=lora.get("target_modules"))
    connector = QFormerConnector(lm.hidden_size, feat_dim, num_queries=cfg.get("num_queries", 64),
                                 num_layers=cfg.get("qformer_layers", 2)).to(device)
    return LLMAssist(connector, lm, prompt=cfg.get("prompt"))

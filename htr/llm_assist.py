"""LLM-assisted training: the QFormerConnector, the FrozenCausalLM it feeds, and what joins them to the recognizer.

For a sampled subset of the batch, frame features tapped in the CTC head (train.llm_tap; the first BiLSTM layer's
output by default), (B, T, C), are compressed by a QFormerConnector into `num_queries` prefix embeddings in the
LLM's embedding space. The FrozenCausalLM reads

    [head] [visual prefix x Q] [bridge] [transcription tokens] [EOS] [pad ...]

where head = BOS + llm.prompt and bridge is empty (raw layout), or, with the LM's chat template
(llm.chat_template), head = the template up to the user's message + llm.prompt and bridge = the rest of it up to the
assistant's answer. It is teacher-forced on the transcription: labels are the text ids and EOS, -100 everywhere
else (HF shifts them internally, so the last position before the text predicts the first text token). The loss
gradient trains the connector (and LoRA, if enabled) and flows back into the recognizer's features, where
TapGradients can rescale it against CTC's (train.llm_grad_ratio). The LLM's own weights never change and never
enter a checkpoint: a state_dict hook on FrozenCausalLM drops every frozen tensor. At inference the LLM is not
loaded, and transformers / peft are imported only inside these classes, so the LLM-off path never imports them.
"""
import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

IGNORE = -100  # label ignored by the cross-entropy


class LLMLoadError(RuntimeError):
    """The language model named by `llm.name` could not be loaded."""


def sinusoid_positions(frames: int, dim: int, device=None) -> torch.Tensor:
    """(frames, dim) fixed sine/cosine positions (Vaswani et al.), for any number of frames."""
    pos = torch.arange(frames, device=device, dtype=torch.float32)[:, None]                  # (T, 1)
    freq = torch.exp(torch.arange(0, dim, 2, device=device).float() * (-math.log(1e4) / dim))  # (ceil(C/2),)
    angles = pos * freq                                                                       # (T, ceil(C/2))
    return torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(1)[:, :dim]            # (T, C)


class QFormerConnector(nn.Module):
    """Learned queries cross-attend to the frames, then an MLP maps them into the LLM embedding space.

    frame_positions: the frames are LayerNorm-ed and given sine positions before the cross-attention (keys and
    values are a Linear of each frame, so without positions the queries cannot tell where a frame is).
    prefix_rms: a LayerNorm on the output, its gain initialised to this value (the LM's embedding RMS), so the
    prefix starts on the scale of the LM's own input embeddings instead of drifting to many times it.
    """

    def __init__(self, llm_hidden: int, feat_dim: int = 512, num_queries: int = 64, num_layers: int = 2,
                 hidden: int = 512, num_heads: int = 8, intermediate: int = 1024, proj_hidden: int = 1024,
                 frame_positions: bool = True, prefix_rms: float | None = None):
        super().__init__()
        from transformers import Blip2QFormerConfig, Blip2QFormerModel
        config = Blip2QFormerConfig(hidden_size=hidden, num_hidden_layers=num_layers, num_attention_heads=num_heads,
                                    intermediate_size=intermediate, cross_attention_frequency=1,
                                    encoder_hidden_size=feat_dim)
        self.queries = nn.Parameter(torch.randn(1, num_queries, hidden) * config.initializer_range)
        self.frame_norm = nn.LayerNorm(feat_dim) if frame_positions else None
        self.qformer = Blip2QFormerModel(config)
        self.proj = nn.Sequential(nn.Linear(hidden, proj_hidden), nn.GELU(), nn.Linear(proj_hidden, llm_hidden))
        self.prefix_norm = None
        if prefix_rms is not None:
            self.prefix_norm = nn.LayerNorm(llm_hidden)
            nn.init.constant_(self.prefix_norm.weight, prefix_rms)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        if self.frame_norm is not None:
            feats = self.frame_norm(feats) + sinusoid_positions(feats.shape[1], feats.shape[2], feats.device)
        queries = self.queries.expand(feats.shape[0], -1, -1)                  # (B, Q, 512)
        out = self.qformer(query_embeds=queries, encoder_hidden_states=feats)  # cross-attends to (B, T, C)
        prefix = self.proj(out.last_hidden_state)                              # (B, Q, 512) -> (B, Q, H)
        return prefix if self.prefix_norm is None else self.prefix_norm(prefix)


class FrameStackConnector(nn.Module):
    """SLAM-ASR's and LAIL's projector: every `stack` adjacent frames, concatenated, become one prefix embedding
    through Linear + GELU + Linear (the 512 -> 1024 -> H expansion). The prefix keeps the line's reading order, one
    embedding per ~stack frames, so the LM's own positions say where each piece of the line is and nothing has to
    learn to find it (the Q-Former's queries must). prefix_rms: as QFormerConnector's."""

    def __init__(self, llm_hidden: int, feat_dim: int = 512, stack: int = 4, proj_hidden: int = 1024,
                 prefix_rms: float | None = None):
        super().__init__()
        self.stack = stack
        self.frame_norm = nn.LayerNorm(feat_dim)
        self.proj = nn.Sequential(nn.Linear(stack * feat_dim, proj_hidden), nn.GELU(),
                                  nn.Linear(proj_hidden, llm_hidden))
        self.prefix_norm = None
        if prefix_rms is not None:
            self.prefix_norm = nn.LayerNorm(llm_hidden)
            nn.init.constant_(self.prefix_norm.weight, prefix_rms)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        feats = F.pad(self.frame_norm(feats), (0, 0, 0, -feats.shape[1] % self.stack))  # (B, T', C), T' = k * stack
        stacked = feats.reshape(feats.shape[0], -1, self.stack * feats.shape[2])      # (B, T'/stack, stack * C)
        prefix = self.proj(stacked)                                                    # (B, T'/stack, H)
        return prefix if self.prefix_norm is None else self.prefix_norm(prefix)


@dataclass
class LMBatch:
    input_ids: torch.Tensor       # (B, L) token ids; the prefix slots hold pad ids, their embeddings get replaced
    labels: torch.Tensor          # (B, L) text ids and EOS, IGNORE elsewhere (unshifted: HF shifts internally)
    attention_mask: torch.Tensor  # (B, L) 1 on real positions, 0 on right padding
    prefix_start: int             # the visual prefix occupies [prefix_start, prefix_start + num_prefix)
    text_start: int               # the first labelled position

    def to(self, device) -> "LMBatch":
        return LMBatch(self.input_ids.to(device), self.labels.to(device), self.attention_mask.to(device),
                       self.prefix_start, self.text_start)


def build_lm_batch(text_ids: list[list[int]], num_prefix: int, head_ids, eos_id: int, pad_id: int,
                   bridge_ids=()) -> LMBatch:
    """head + prefix placeholders + bridge + text + EOS per row, right-padded; only text and EOS are labelled."""
    head, bridge = list(head_ids), list(bridge_ids)
    text_start = len(head) + num_prefix + len(bridge)
    rows = [head + [pad_id] * num_prefix + bridge + ids + [eos_id] for ids in text_ids]
    shape = (len(rows), max(map(len, rows)))
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE, dtype=torch.long)
    attention_mask = torch.zeros(shape, dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, :len(row)] = torch.tensor(row)
        labels[i, text_start:len(row)] = torch.tensor(row[text_start:])
        attention_mask[i, :len(row)] = 1
    return LMBatch(input_ids, labels, attention_mask, len(head), text_start)


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


def lora_target_error(targets, name: str, reason: str) -> LLMLoadError:
    """llm.lora.target_modules that adapt no layer of the LM `name`, and how to name them."""
    return LLMLoadError(f"llm.lora.target_modules={targets!r} names no layer of {name!r} ({reason}): use its module "
                        f"names (e.g. [q_proj,v_proj] for Llama), all-linear, or leave it empty for peft's default")


class FrozenCausalLM(nn.Module):
    """A Hugging Face causal LM + tokenizer with frozen weights, pinned to eval mode (LoRA dropout excepted).

    Its layout (`head_ids` before the visual prefix, `bridge_ids` after it) is raw, BOS + prompt, or, with
    chat_template=True, the tokenizer's chat template around a user message (prompt + prefix) and the
    assistant's answer (the text): an instruction-tuned LM ends its answers with EOS but not every line.
    """

    PREFIX_MARK = "\x00PREFIX\x00"  # where the visual prefix goes in the rendered chat template

    def __init__(self, name: str, device: torch.device, gguf_file: str | None = None,
                 attn_implementation: str | None = None, load_in_4bit: bool = False,
                 dtype: torch.dtype | None = None, prompt: str | None = None, chat_template: bool | str = False):
        super().__init__()
        self.name = name
        device = torch.device(device)
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        self.tokenizer, self.model = self._load(name, device, dtype, gguf_file, attn_implementation, load_in_4bit)
        self.model.requires_grad_(False)
        tok = self.tokenizer
        if tok.eos_token_id is None:
            raise LLMLoadError(f"llm.name={name!r}: its tokenizer has no EOS token, which the LLM loss needs to "
                               f"end a line; use another LM or set its eos_token in tokenizer_config.json")
        self.bos_id = tok.bos_token_id  # None for e.g. Qwen2 (trained without BOS); GPT-2's is <|endoftext|> = EOS
        self.eos_id = tok.eos_token_id
        self.pad_id = tok.eos_token_id if tok.pad_token_id is None else tok.pad_token_id  # pads are masked anyway
        self.token_ids: dict[str, list[int]] = {}                      # each distinct text is tokenised once
        self.chat = bool(tok.chat_template) if chat_template == "auto" else bool(chat_template)
        self.head_ids, self.bridge_ids = self._layout(prompt or "")
        self.register_state_dict_post_hook(_drop_frozen)
        self.train(False)

    def _layout(self, prompt: str) -> tuple[list[int], list[int]]:
        tok = self.tokenizer
        if not self.chat:
            return ([] if self.bos_id is None else [self.bos_id]) + self.encode([prompt])[0], []
        if not tok.chat_template:
            raise LLMLoadError(f"llm.chat_template=true but the tokenizer of llm.name={self.name!r} has no chat "
                               f"template: set llm.chat_template=false (or auto)")
        text = tok.apply_chat_template([{"role": "user", "content": prompt + self.PREFIX_MARK}], tokenize=False,
                                       add_generation_prompt=True)
        head, bridge = text.split(self.PREFIX_MARK)
        return [tok(part, add_special_tokens=False).input_ids for part in (head, bridge)]

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
                 target_modules: str | list[str] | None = None) -> None:
        """Wrap the LLM with trainable LoRA adapters. target_modules: module names, or one string as peft reads it
        ("all-linear", or a regex of full module names); None = peft's usual targets for the model type."""
        from peft import LoraConfig, get_peft_model
        targets = target_modules if target_modules is None or isinstance(target_modules, str) else list(target_modules)
        if isinstance(targets, list):                                   # peft would skip a missing one without a word
            modules = [n for n, _ in self.model.named_modules()]
            unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n in modules)]
            if unmatched:
                raise lora_target_error(target_modules, self.name, f"no module named {', '.join(unmatched)}")
        try:
            config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, task_type="CAUSAL_LM",
                                target_modules=targets)
            self.model = get_peft_model(self.model, config)
        except ValueError as e:                                         # peft's when nothing matches
            raise lora_target_error(target_modules, self.name, str(e).splitlines()[0][:200]) from None
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

    def embedding_rms(self) -> float:
        """Root mean square of the input embedding matrix: the scale of what the LM reads."""
        return self.model.get_input_embeddings().weight.float().pow(2).mean().sqrt().item()

    def encode(self, texts: list[str]) -> list[list[int]]:
        for text in set(texts) - self.token_ids.keys():
            self.token_ids[text] = self.tokenizer(text, add_special_tokens=False).input_ids
        return [self.token_ids[t] for t in texts]

    def batch(self, texts: list[str], num_prefix: int) -> LMBatch:
        return build_lm_batch(self.encode(texts), num_prefix, self.head_ids, self.eos_id, self.pad_id,
                              self.bridge_ids)

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

    def __init__(self, connector: nn.Module, lm: FrozenCausalLM):
        super().__init__()
        self.connector = connector
        self.lm = lm

    def prefix(self, feats: torch.Tensor) -> torch.Tensor:
        return self.connector(feats).to(self.lm.dtype)  # (B, T, C) -> (B, Q, H)

    def loss(self, prefix: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """L_LLM of `texts` after `prefix` (B, Q, H); Q = 0 gives the LM's loss on the text alone."""
        batch = self.lm.batch(texts, prefix.shape[1]).to(prefix.device)
        embeds = self.lm.embed(batch.input_ids)                                        # (B, L, H)
        start, end = batch.prefix_start, batch.prefix_start + prefix.shape[1]
        embeds = torch.cat([embeds[:, :start], prefix, embeds[:, end:]], dim=1)         # (B, L, H)
        return self.lm(embeds, batch.attention_mask, batch.labels, first_label=batch.text_start)

    def forward(self, feats: torch.Tensor, texts: list[str]) -> torch.Tensor:
        return self.loss(self.prefix(feats), texts)

    @torch.no_grad()
    def diagnostics(self, feats: torch.Tensor, texts: list[str]) -> dict:
        """Does the prefix carry the line? L_LLM, the LM's loss on the text alone, and with the prefix of another
        line (the batch rolled by one), in nats per token; and the prefix's RMS over the LM's embedding RMS."""
        prefix = self.prefix(feats)                                                    # (B, Q, H)
        return {"llm": self.loss(prefix, texts).item(),
                "llm_text_only": self.loss(prefix[:, :0], texts).item(),
                "llm_shuffled": self.loss(prefix.roll(1, dims=0), texts).item() if len(texts) > 1 else math.nan,
                "prefix_rms": prefix.float().pow(2).mean().sqrt().item() / self.lm.embedding_rms()}

    @torch.no_grad()
    def read(self, feats: torch.Tensor, max_new_tokens: int) -> list[str]:
        """The reading test: what the frozen LM writes, greedily, from the prefix alone (no text given)."""
        prefix = self.prefix(feats)                                                    # (B, Q, H)
        around = [self.lm.embed(torch.tensor(ids, device=prefix.device, dtype=torch.long))[None]
                  .expand(len(prefix), -1, -1) for ids in (self.lm.head_ids, self.lm.bridge_ids)]
        embeds = torch.cat([around[0], prefix, around[1]], dim=1)                      # (B, L, H)
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        with torch.compiler.set_stance("force_eager"):                                # llm.compile: no new graphs
            out = self.lm.model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_new_tokens,
                                         do_sample=False, eos_token_id=self.lm.eos_id, pad_token_id=self.lm.pad_id)
        return [t.strip() for t in self.lm.tokenizer.batch_decode(out, skip_special_tokens=True)]

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
        """ValueError naming what differs: other tensors (other llm.* keys) or other shapes (another LM width)."""
        own = self.state_dict()
        if set(state_dict) != set(own):
            raise ValueError(f"LLM-assist checkpoint mismatch: missing {sorted(own.keys() - state_dict.keys())[:5]}, "
                             f"unexpected {sorted(state_dict.keys() - own.keys())[:5]} (same llm.* config as "
                             f"training?)")
        shapes = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)} here" for k, v in state_dict.items()
                  if v.shape != own[k].shape]
        if shapes:
            raise ValueError(f"the connector was trained for another LM or tap width: {'; '.join(shapes[:3])} "
                             f"(use the llm.name and train.llm_tap it was trained with, or train a new one)")
        self.load_state_dict(state_dict, strict=False)  # strict=False: the frozen LLM weights are not in it


class _LLMBranch(torch.autograd.Function):
    """tap[idx] for the LLM path. Its backward hands the LLM's gradient to `parts` instead of adding it into the
    tap's, so a hook on the tap sees CTC's part alone (no subtraction, exact in bf16 too)."""

    @staticmethod
    def forward(ctx, tap, idx, parts):
        ctx.idx, ctx.parts, ctx.shape = idx, parts, tap.shape
        return tap[idx]

    @staticmethod
    def backward(ctx, g_sub):
        g_llm = g_sub.new_zeros(ctx.shape)
        g_llm[ctx.idx] = g_sub                                                         # (B, T, C)
        ctx.parts["llm"] = g_llm
        return torch.zeros_like(g_llm), None, None


class TapGradients:
    """The gradient at the tapped features, in its CTC and LLM parts.

    `attach(tap, idx)` returns tap[idx] for the LLM path. When the backward pass reaches the tap, both parts' norms
    and their cosine are kept in `stats`, and the sum flows on into the recognizer, the LLM part rescaled, with
    ratio > 0, to `ratio` x the CTC part's norm: a target ratio of gradient norms, whatever α and the two losses'
    scales are (ratio 0: as α·L_LLM gives it).
    """

    def __init__(self, ratio: float = 0.0):
        self.ratio = ratio
        self.stats: dict[str, float] = {}

    def attach(self, tap: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        if not tap.requires_grad:
            return tap[idx]                                                            # (B', T, C)
        parts = {}
        tap.register_hook(lambda g_ctc: self._combine(g_ctc, parts.pop("llm", None)))
        return _LLMBranch.apply(tap, idx, parts)

    def _combine(self, g_ctc: torch.Tensor, g_llm):
        if g_llm is None:                                                              # no LLM loss this step
            return None
        n_ctc, n_llm = g_ctc.float().norm(), g_llm.float().norm()
        scale = self.ratio * n_ctc / n_llm.clamp_min(1e-12) if self.ratio > 0 else torch.ones_like(n_ctc)
        cosine = F.cosine_similarity(g_ctc.flatten().float(), g_llm.flatten().float(), dim=0)
        values = torch.stack([n_ctc, n_llm, scale, cosine]).tolist()                  # one device sync
        self.stats = dict(zip(("grad_ctc", "grad_llm", "grad_llm_scale", "grad_cosine"), values))
        return g_ctc + (scale * g_llm.float()).to(g_ctc.dtype)


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
    feat_dim is the width of the tapped features (HTRNet.tap_width)."""
    device = torch.device(device)
    attn = cfg.get("attn_implementation") or ("eager" if device.type == "cpu" else None)
    chat = cfg.get("chat_template", False)
    if chat not in (True, False, "auto"):
        raise LLMLoadError(f"llm.chat_template must be auto, true or false, got {chat!r}")
    lm = FrozenCausalLM(cfg.get("name", "meta-llama/Llama-3.2-3B"), device, gguf_file=cfg.get("gguf_file"),
                        attn_implementation=attn, load_in_4bit=cfg.get("qlora", False),
                        dtype=llm_dtype(cfg.get("dtype", "auto"), device), prompt=cfg.get("prompt"),
                        chat_template=chat)
    lora = cfg.get("lora") or {}
    if lora.get("enabled", False):
        lm.add_lora(r=lora.get("r", 8), alpha=lora.get("alpha", 16), dropout=lora.get("dropout", 0.05),
                    target_modules=lora.get("target_modules"))
    if cfg.get("compile", False):  # inductor fuses the norms, rotary and activations between the matmuls
        from utils import require_cpp_compiler
        require_cpp_compiler(device, "llm.compile=true", "set llm.compile=false")
        lm.model.compile(dynamic=True)
    return LLMAssist(build_connector(cfg, lm, feat_dim).to(device), lm)


def build_connector(cfg, lm: FrozenCausalLM, feat_dim: int) -> nn.Module:
    """llm.connector: qformer (QFormerConnector, llm.num_queries) | frame_stack (FrameStackConnector, llm.frame_stack)."""
    kind = cfg.get("connector", "qformer")
    prefix_rms = lm.embedding_rms() if cfg.get("prefix_norm", False) else None
    if kind == "qformer":
        return QFormerConnector(lm.hidden_size, feat_dim, num_queries=cfg.get("num_queries", 64),
                                num_layers=cfg.get("qformer_layers", 2),
                                frame_positions=cfg.get("frame_positions", False), prefix_rms=prefix_rms)
    if kind == "frame_stack":
        stack = cfg.get("frame_stack", 4)
        if not isinstance(stack, int) or stack < 1:
            raise LLMLoadError(f"llm.frame_stack must be a whole number of frames >= 1, got {stack!r}")
        return FrameStackConnector(lm.hidden_size, feat_dim, stack=stack, prefix_rms=prefix_rms)
    raise LLMLoadError(f"llm.connector must be qformer or frame_stack, got {kind!r}")

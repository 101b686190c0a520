"""Throughput benchmark, JSON on stdout: python benchmark.py [config.yaml] [key=value ...] [--steps N] [--compile]
                                        python benchmark.py config.yaml data.path=DIR --loader 0,1,2,8

Measures, in one process, a plain baseline (fp32, eager, NCHW, no_grad) and the tuned path the scripts use
(train.channels_last, BatchNorm folded and channels_last for inference, inference_mode, bf16 autocast per
train/eval.mixed_precision (auto: where the GPU or CPU has native bf16), cudnn.benchmark on CUDA, optional
torch.compile), and on the CPU the exported model in onnxruntime (fp32 and int8, as export.py writes them), and
prints their ratios: these machines are noisy and only same-run ratios are stable.
Train = forward + backward + optimizer step at train.batch_size on random (B, 1, H, W) lines (with
arch.audio.enabled=true each with a random 3 s reading: the fused path); eval = batched forward at
eval.batch_size; demo = one line. achieved_gflops = lines/s x the forward's FLOPs (x3 for a train
step), to compare with what the machine's convolutions and matmuls can do.
--contention measures only the CPU train step, alone and beside one CPU-bound process, with the thread count
trainer.py picks and with every usable CPU.
--loader measures only the training data loader (lines/s, augmentation on, as trainer.py builds it) on the train
split of data.path for each worker count given, each a full start (fork) and `--loader-lines` lines.
"""
import argparse
import json

from htr.benchmarks import benchmark
from utils import load_config, run_main


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", default="config.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    parser.add_argument("--steps", type=int, default=3, help="timed iterations per measurement")
    parser.add_argument("--compile", action="store_true", help="torch.compile the tuned variant")
    parser.add_argument("--llm", action="store_true",
                        help="also time the tuned train step with the LLM path on vs off (llm.* config keys)")
    parser.add_argument("--contention", action="store_true",
                        help="only time the CPU train step alone and beside a CPU-bound process (thread choice)")
    parser.add_argument("--loader", help="only time the training data loader, for these worker counts (0,1,2,8)")
    parser.add_argument("--loader-lines", type=int, default=512, help="lines read per worker count")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    print(json.dumps(benchmark(cfg, args.config, args.steps, args.compile, args.llm, args.contention, args.loader,
                               args.loader_lines), indent=2))


if __name__ == "__main__":
    run_main(main)

"""The LLM ablation (what ablate.py runs): every arm x seed trained by trainer.py in a subprocess (resumable),
evaluated line by line on eval.split, compared against llm_off with paired-bootstrap confidence intervals; the tables
and the validation curves."""
import csv
import json
import logging
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
from rapidfuzz.distance import Levenshtein

from dataset import die_with_parent
from htr.evaluation import beam_decode, check_decode_mode, infer, make_loader
from htr.onnx_runtime import load_recognizer
from utils import UserError, atomic_write, load_config, resolve_device

log = logging.getLogger("htr")
BASE_ARMS = {"llm_off": ["train.use_llm=false"], "llm_on": ["train.use_llm=true"]}
BOOTSTRAP = 2000
HEARTBEAT_S = 5                       # seconds between updates of a running run's partial.json (its wall time)
ROOT = Path(__file__).resolve().parents[1]                         # trainer.py is there


def parse_arms(specs: list) -> dict:
    """`NAME:key=value,key=value` specs -> {name: overrides}, after the two base arms."""
    arms = dict(BASE_ARMS)
    for spec in specs:
        name, sep, rest = spec.partition(":")
        overrides = [kv for kv in rest.split(",") if kv]
        if not sep or not name or not overrides or any("=" not in kv for kv in overrides):
            raise UserError(f"--arm {spec!r}: expected NAME:key=value[,key=value ...]")
        if name in arms:
            raise UserError(f"--arm {spec!r}: an arm named {name!r} exists already")
        arms[name] = overrides
    return arms


# ------------------------------------------------------------------------------------------------------ training

def train_all(config: str, runs: list, jobs: int) -> dict:
    """Train (or finish) every run of `runs` ([(run_dir, overrides)]) with trainer.py, `jobs` side by side; returns
    {run_dir: training wall seconds} (a resumed run adds up its parts). A run is finished when its done.json exists.
    SIGINT/SIGTERM sent to this process are passed on to every running trainer (each writes last.pt and exits); after
    a signal or a failed run no new run starts, the running ones are stopped the same way (a failed run sends them one
    SIGTERM, unless a signal already went), and the error names them."""
    seconds = {d: json.loads((d / "done.json").read_text())["train_seconds"] for d, _ in runs
               if (d / "done.json").is_file()}
    queue = [(d, o) for d, o in runs if d not in seconds]
    running, stopped, sent = {}, [], []           # {trainer: (run_dir, start less its earlier parts)}, names, signals
    saved = time.perf_counter()                          # when partial.json was last written

    def stop(signum, frame=None):
        queue.clear()
        sent.append(signum)
        for child in running:
            child.send_signal(signum)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while queue or running:
            while queue and len(running) < jobs:
                run_dir, overrides = queue.pop(0)
                earlier = spent_before(run_dir)                  # the parts of a resumed run count from its start
                running[start(config, overrides, run_dir)] = (run_dir, time.perf_counter() - earlier)
            time.sleep(0.2)
            if time.perf_counter() - saved > HEARTBEAT_S:    # if this process is killed, a run's time survives
                saved = time.perf_counter()
                for run_dir, t0 in running.values():
                    record(run_dir, saved - t0, finished=False)
            for child in [c for c in running if c.poll() is not None]:
                run_dir, t0 = running.pop(child)
                spent = time.perf_counter() - t0
                record(run_dir, spent, finished=child.returncode == 0)
                if child.returncode == 0:
                    seconds[run_dir] = spent
                    log.info("finished %s (%.1f min)", run_dir.name, spent / 60)
                else:
                    stopped.append(f"{run_dir.name} ({exit_reason(child.returncode)})")
                    if not sent:                             # a second signal would stop the others without last.pt
                        stop(signal.SIGTERM)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    unfinished = [d.name for d, _ in runs if d not in seconds]
    if unfinished:
        raise UserError(f"training stopped ({', '.join(stopped) or 'interrupted'}), unfinished: "
                        f"{', '.join(unfinished)}; run the same command again to resume the ablation where it stopped")
    return seconds


def exit_reason(status: int) -> str:
    """A trainer's exit status in words: 128 + n after it stopped on signal n, -n if signal n killed it."""
    if status > 128 and status - 128 in signal.valid_signals():
        return f"stopped by {signal.Signals(status - 128).name}"
    if status < 0:
        return f"killed by {signal.Signals(-status).name}"
    return f"exit status {status}"


def spent_before(run_dir: Path) -> float:
    """Training wall seconds of the run's earlier, interrupted parts (partial.json; 0 for a new run)."""
    path = run_dir / "partial.json"
    return json.loads(path.read_text())["train_seconds"] if path.is_file() else 0.0


def record(run_dir: Path, seconds: float, finished: bool) -> None:
    """Write the run's training wall seconds so far: done.json when it finished, else partial.json (atomically)."""
    with atomic_write(run_dir / ("done.json" if finished else "partial.json"), "w") as f:
        json.dump({"train_seconds": seconds}, f)
    if finished:
        (run_dir / "partial.json").unlink(missing_ok=True)


def start(config: str, overrides: list, run_dir: Path) -> subprocess.Popen:
    """Start trainer.py on one run: from scratch, or resumed from its last.pt. It runs in its own session, so a
    Ctrl-C in the terminal reaches it once, passed on by train_all, not twice (twice exits without last.pt); and it
    gets a SIGTERM (stops, writes last.pt) if this process dies without passing one on (SIGKILL, SIGHUP)."""
    resume = [f"resume={run_dir / 'last.pt'}", "train.init_from=null"] if (run_dir / "last.pt").is_file() \
        else []                                                         # the run's own weights already hold init_from
    log.info("%s %s", "resuming" if resume else "training", run_dir.name)
    return subprocess.Popen([sys.executable, str(ROOT / "trainer.py"), config, *overrides, *resume], cwd=ROOT,
                            start_new_session=True, preexec_fn=partial(die_with_parent, signal.SIGTERM))


# ---------------------------------------------------------------------------------------------------- evaluation

def line_errors(cfg, checkpoint: Path) -> dict:
    """{decoding: {line id: (character errors, reference length)}} of a checkpoint on eval.split, decoded as
    evaluate.py decodes (greedy; and beam + LM with decode.mode=beam)."""
    model, charset = load_recognizer(cfg, checkpoint, cfg.runtime, resolve_device(cfg.device), channels_last=True)
    out = infer(cfg, model, make_loader(cfg, cfg.eval.split, charset), charset)
    out["greedy"] = out.pop("hyps")
    if cfg.decode.mode == "beam":
        beam_decode(cfg, model, charset, out, checkpoint)
    return {mode: {i: (Levenshtein.distance(r, h), len(r)) for i, r, h in zip(out["ids"], out["refs"], out[mode])}
            for mode in ("greedy", "beam", "llm") if mode in out}


def corpus_cer(errors: np.ndarray, lengths: np.ndarray) -> float:
    return float(errors.sum() / max(lengths.sum(), 1))


def bootstrap_ci(arm: np.ndarray, base: np.ndarray, lengths: np.ndarray, seed: int = 0) -> tuple:
    """95 % interval of CER(arm) - CER(base) over test lines resampled with replacement (paired: both arms on the
    same resampled lines). arm/base: (lines,) errors per line, already averaged over seeds."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(lengths), (BOOTSTRAP, len(lengths)))                # (resamples, lines)
    diffs = (arm[idx].sum(1) - base[idx].sum(1)) / np.maximum(lengths[idx].sum(1), 1)
    return tuple(float(v) for v in np.percentile(diffs, [2.5, 97.5]))


def summarise(results: dict, mode: str) -> list:
    """results[arm][seed] = {"errors": {mode: {id: (e, n)}}, "seconds": s} -> one table row per arm."""
    reference = next(iter(results["llm_off"].values()))["errors"][mode]             # {id: (errors, length)}
    ids = sorted(reference)
    lengths = np.array([reference[i][1] for i in ids], float)

    def mean_errors(arm):
        return np.mean([[run["errors"][mode][i][0] for i in ids] for run in results[arm].values()], axis=0)

    base = mean_errors("llm_off")
    rows = []
    for arm, runs in results.items():
        errors = mean_errors(arm)
        per_seed = {s: corpus_cer(np.array([r["errors"][mode][i][0] for i in ids]), lengths) for s, r in runs.items()}
        low, high = bootstrap_ci(errors, base, lengths)
        rows.append({"arm": arm, "decoding": mode, "seeds": len(runs), "test_cer": corpus_cer(errors, lengths),
                     "cer_per_seed": " ".join(f"{v:.4f}" for v in per_seed.values()),
                     "delta_vs_llm_off": corpus_cer(errors, lengths) - corpus_cer(base, lengths),
                     "ci95_low": low, "ci95_high": high, "test_lines": len(ids),
                     "train_minutes": float(np.mean([r["seconds"] for r in runs.values()])) / 60})
    return rows


# ------------------------------------------------------------------------------------------------------- outputs

def write_tables(rows: list, out: Path) -> None:
    with open(out / "ablation.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| arm | decoding | seeds | test CER | per seed | Δ vs llm_off (95 % CI) | train min |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        delta = "—" if r["arm"] == "llm_off" else \
            f"{100 * r['delta_vs_llm_off']:+.2f} ({100 * r['ci95_low']:+.2f}, {100 * r['ci95_high']:+.2f})"
        seeds = ", ".join(f"{100 * float(v):.2f}" for v in r["cer_per_seed"].split())
        lines.append(f"| {r['arm']} | {r['decoding']} | {r['seeds']} | {100 * r['test_cer']:.2f} % | {seeds} | "
                     f"{delta} | {r['train_minutes']:.1f} |")
    (out / "ablation.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def plot_curves(run_dirs: dict, out: Path) -> None:
    """Validation CER per step of every run: one colour per arm, one line style per seed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from htr.runlog import read_rows
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for a, (arm, seeds) in enumerate(run_dirs.items()):
        for s, (seed, run_dir) in enumerate(seeds.items()):
            val = [r for r in read_rows(run_dir / "metrics.csv", "epoch") if "val_cer" in r]
            ax.plot([r["step"] for r in val], [100 * r["val_cer"] for r in val], color=f"C{a}",
                    linestyle=["-", "--", ":", "-."][s % 4], marker="o", markersize=3, label=f"{arm} seed {seed}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation CER (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "val_curves.png", dpi=100)
    plt.close(fig)


def run(config: str, overrides: list, seeds: list, arm_specs: list, out: Path, jobs: int = 1) -> None:
    """Train (`jobs` runs side by side) and evaluate every arm (the base two and `arm_specs`) x seed under out/runs,
    then write out/ablation.csv, out/ablation.md (also printed) and out/val_curves.png."""
    if jobs < 1:
        raise UserError(f"--jobs {jobs}: the number of runs to train side by side must be at least 1")
    arms, out = parse_arms(arm_specs), out.resolve()
    plan = []                                # every arm's config is checked before the first one trains
    for arm, arm_overrides in arms.items():
        for seed in seeds:
            run_dir = out / "runs" / f"{arm}_s{seed}"
            run_overrides = [*overrides, *arm_overrides, f"seed={seed}", f"model.save_dir={out / 'runs'}",
                             f"model.run_name={run_dir.name}"]
            cfg = load_config(config, run_overrides)
            check_decode_mode(cfg)
            plan.append((arm, seed, run_dir, run_overrides, cfg))
    seconds = train_all(str(Path(config).resolve()), [(run_dir, o) for _, _, run_dir, o, _ in plan], jobs)
    results, run_dirs = {}, {}
    for arm, seed, run_dir, _, cfg in plan:
        best = run_dir / "best.pt" if (run_dir / "best.pt").is_file() else run_dir / "last.pt"
        results.setdefault(arm, {})[seed] = {"errors": line_errors(cfg, best), "seconds": seconds[run_dir]}
        run_dirs.setdefault(arm, {})[seed] = run_dir
    modes = list(next(iter(results["llm_off"].values()))["errors"])
    rows = [row for mode in modes for row in summarise(results, mode)]
    write_tables(rows, out)
    plot_curves(run_dirs, out)
    print((out / "ablation.md").read_text(), end="")
    log.info("wrote %s, %s and %s", out / "ablation.csv", out / "ablation.md", out / "val_curves.png")

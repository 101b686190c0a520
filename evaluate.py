"""Evaluate a checkpoint: python evaluate.py config.yaml resume=run/best.pt [eval.split=test] [data.path=...]

Greedy CTC decoding by default; with decode.mode=beam also CTC prefix beam search with a character n-gram LM,
reported side by side (decode.build_lm=true estimates the LM, decode.tune=true tunes its weight on val). Writes
eval_<data>_<split>.json (report) and eval_<data>_<split>.csv (lines, worst first) next to the checkpoint (into a
model folder; for a Hub id into ./<owner>--<name>/), <data> being the last two components of data.path
(data_name), so evaluating other data never overwrites a report. The report records what was measured: data path
(resolved), split, runtime, decoding settings and the model (checkpoint, charset size, architecture, training
epoch and step).
"""
from htr.evaluation import evaluate
from utils import config_from_cli, run_main


def main(argv=None):
    cfg, _ = config_from_cli(argv, "evaluate.py", need_resume=True)
    report = evaluate(cfg, cfg.resume)
    for mode in ("greedy", "beam", "llm"):
        if mode in report:
            print(f"{report['split']} ({mode}): CER {100 * report[mode]['cer']:.2f}%  "
                  f"WER {100 * report[mode]['wer']:.2f}%  ({report['lines']} lines, {report['skipped']} skipped)")


if __name__ == "__main__":
    run_main(main)

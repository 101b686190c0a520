"""Give a line dataset a speech track: a spoken reading of every line's transcription, synthesised with espeak-ng.

    python prepare_speech.py DATA_ROOT [--splits train,val,test] [--voices en,en-us+f3,...] [--snr clean 20 5]
        [--mute-words 0.3] [--workers N] [--seed 0] [--out DIR] [--force]

Writes <id>.wav (16 kHz mono 16-bit) beside every <id>.png of DATA_ROOT/<split>/ (or of each shard-NNNNN/ of a
sharded split), or with --out into the same layout under DIR, and a speech.json per folder of lines: the settings
and, per line, its text, duration, SNR, reading style, word spans (seconds) and muted words. Each line is read
in a voice drawn from --voices at a random rate, pitch and pitch range, with random pauses, half of the time in a
synthetic room (reverberation), sometimes through a codec (8-bit mu-law, 8 kHz band limit), with pink background
noise at an SNR drawn from --snr (`clean`: none), and --mute-words of its words silenced.

Same seed -> byte-identical files, whatever --workers: a line depends on (seed, split, id) alone. Files are written
atomically; a rerun with the same arguments skips complete lines (resuming a killed run), one with other
settings is refused unless --force (which rewrites the folder's audio). Audio that prepare_speech.py did not
write (no speech.json) is never overwritten without --force. See docs/speech.md.
"""
import argparse
from pathlib import Path

from htr.speech_synthesis import VOICES
from htr.speech_writer import write_speech
from utils import run_main, usable_cpus


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data_root", type=Path, help="a line dataset: DATA_ROOT/<split>/<id>.png + gt.txt")
    p.add_argument("--splits", default="train,val,test", help="comma-separated (default: train,val,test)")
    p.add_argument("--voices", default=",".join(VOICES),
                   help="comma-separated espeak-ng voices, language[+variant] (default: %(default)s)")
    p.add_argument("--snr", nargs="+", default=["clean"],
                   help="background noise in dB below the speech, or clean; several: one drawn per line")
    p.add_argument("--mute-words", type=float, default=0.0, help="fraction of each line's words to silence")
    p.add_argument("--workers", type=int, default=usable_cpus(), help="processes (default: the usable CPUs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="write the audio under this folder (same layout) instead")
    p.add_argument("--force", action="store_true", help="replace audio written with other settings, or not by "
                                                        "this command")
    args = p.parse_args(argv)
    write_speech(args.data_root, args.splits.split(","), args.voices.split(","), args.snr, args.mute_words,
                 args.workers, args.seed, args.out, args.force)


if __name__ == "__main__":
    run_main(main)

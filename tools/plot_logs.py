"""Plot training curves from train.py's log.jsonl: losses, learning rate, images/s and AP, runs overlaid.

    python tools/plot_logs.py output/demo/log.jsonl                       # -> output/demo/curves.png
    python tools/plot_logs.py output/run_a output/run_b --output cmp.png  # two runs in one figure
    python tools/plot_logs.py output/*/log.jsonl --labels sgd adamw cosine

Each argument is a log.jsonl or a run folder holding one. One PNG with six panels against
the iteration: total, classification and box-regression losses, learning rate, training
images/s, and COCO AP (AP50 dashed) at each evaluation; one colour per run. A resumed
run's repeated iterations count once (the later record). Needs matplotlib.
"""
import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.runtime.errors import UserError, exit_on_user_error  # noqa: E402
from utils.runtime.logger import setup_logging  # noqa: E402
from utils.visual.training_curves import log_path, plot_runs, read_log, summary_lines, unique_labels  # noqa: E402

logger = logging.getLogger("plot_logs")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("plot_logs.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("logs", nargs="+", help="log.jsonl files or run folders (train.py --output-dir)")
    parser.add_argument("--labels", nargs="+", help="legend name of each run (default: the run folders' names)")
    parser.add_argument("--output", help="PNG to write (default: curves.png beside the log with one run, "
                        "./curves.png with several)")
    return parser


def main(args) -> Path:
    if args.labels and len(args.labels) != len(args.logs):
        raise UserError(f"--labels gives {len(args.labels)} names for {len(args.logs)} logs")
    labels = args.labels or unique_labels(args.logs)
    runs = [read_log(path, label) for path, label in zip(args.logs, labels)]
    output = Path(args.output) if args.output else (log_path(args.logs[0]).parent / "curves.png"
                                                    if len(runs) == 1 else Path("curves.png"))
    try:
        written = plot_runs(runs, output)
    except ImportError:
        raise UserError("plotting needs matplotlib: pip install matplotlib") from None
    for line in summary_lines(runs):
        logger.info("%s", line)
    logger.info("wrote %s", written)
    return written


if __name__ == "__main__":
    setup_logging(verbose=False)
    exit_on_user_error(main, get_args_parser().parse_args())

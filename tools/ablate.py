"""The paper's ablations (Table 1) from one command: a grid of training runs on the same data with
the same seed and the same iteration budget, each evaluated with COCO AP, in one table.

    python tools/ablate.py --grid loss                   # CE / alpha-CE / OHEM / FL on the demo data
    python tools/ablate.py --grid loss --seeds 3         # each cell with seeds 42, 43, 44: mean, std, intervals
    python tools/ablate.py --grid imbalance --seeds 3 --data-preset sparse   # a COCO-like imbalance
    python tools/ablate.py --grid gamma --iters 1000     # Table 1b
    python tools/ablate.py --set focal_gamma=0,1,2 --set focal_alpha=0.25,0.75   # a free grid (product)
    python tools/ablate.py --grid ohem --data-path /data/coco --min-size 600 --max-size 1000 --amp fp16

Every option ablate.py does not know goes to each cell's train.py (data, model, optimisation,
runtime flags). Grids: alpha-ce (1a), gamma (1b), anchors (1c), ohem (1d), loss, imbalance, scale
(1e and Figure 2), see tools/ablation_grids.py. The budget is in iterations (``train.py --iters``),
not wall time, so a busy machine changes how long a grid takes, never its numbers.

Each cell trains as a train.py subprocess in OUTPUT/cells/NAME/. A finished cell (its
``cell.json``) is not run again and a killed one resumes from its newest checkpoint, so the
same command continues an interrupted grid. After every cell OUTPUT/ablation.md (the table),
ablation.json and ablation.png are rewritten.

Seeds: ``--seeds N`` trains every cell with seeds base, base + 1, ... (base: train.py's --seed,
given or its default), ``--seed-list`` with those seeds; each run lives in
OUTPUT/cells/NAME/seed-S/ with its own ``cell.json`` and is skipped or resumed like a cell, so a
grid can be run over several sittings and extended from 2 seeds to 3 without redoing any. Runs go
seed by seed (every cell's first seed, then every cell's second), so a grid stopped early still
has whole seeds. The report gives mean +- std, the 95 % interval of the mean and every cell's
paired difference to the baseline cell (``--baseline``, else the grid's reference setting,
tools/ablation_grids.py BASELINES), see tools/ablation_stats.py.

Before training, the foreground : background anchor ratio of the grid's validation data is
measured at the common flags' anchors and training size (tools/anchor_balance.py) and printed
and written into ablation.md. ``--data-preset sparse`` trains on the COCO-like preset of the demo
data (generated into data/demo-sparse on first use).
"""
import argparse
import contextlib
import io
import logging
import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the ablation_* modules beside this script

import torch  # noqa: E402

from ablation_grids import (GRIDS, baseline_index, cell_flags, cell_label, cell_slug, combine,  # noqa: E402
                            grid_cells, parse_set)
from ablation_report import COLUMNS, write_report  # noqa: E402
from ablation_runs import read_record, run_cell  # noqa: E402
from ablation_stats import seeded_cell  # noqa: E402
from anchor_balance import dataset_anchor_balance, format_balance  # noqa: E402
from recipes import resolve_config  # noqa: E402
from train_options import get_args_parser as train_args_parser  # noqa: E402
from utils.data.demo_data import PRESETS, ensure_demo_dataset, preset_root  # noqa: E402
from utils.runtime.errors import ConfigError, UserError, exit_on_user_error  # noqa: E402
from utils.runtime.logger import setup_logging  # noqa: E402

logger = logging.getLogger("ablate")

# ablate.py decides these for every cell itself.
RESERVED_FLAGS = ("--output-dir", "--iters", "--epochs", "--max-iters", "--resume", "--eval-only")
# Demo: 1000 iterations of batch 8 (8000 images, 2.7 epochs) take ~7 min per cell on 2 CPU cores.
# COCO: the paper's 90k iterations at batch 16.
DEFAULT_ITERS = {"demo": 1000, "coco": 90000}
BALANCE_IMAGES = 500  # validation images (a seeded sample) the anchor ratio is counted on


def get_args_parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: an abbreviated train.py flag must reach train.py, not match one of ours.
    parser = argparse.ArgumentParser(
        "RetinaNet ablations", allow_abbrev=False,
        description="Train and evaluate a grid of settings with the same data, seed and iteration budget. "
                    "Every other option is passed to train.py for each cell.")
    parser.add_argument("--grid", choices=sorted(GRIDS), help="a built-in grid: " + "; ".join(
        f"{name}: {description}" for name, (description, _) in GRIDS.items()).replace("%", "%%"))
    parser.add_argument("--set", action="append", metavar="KEY=V1,V2",
                        help="a free grid axis (train.py option name and values; repeat for a product; with "
                             "--grid, applied to every grid cell)")
    parser.add_argument("--iters", type=int, help="iterations per cell (default: demo recipe 1000, coco 90000)")
    parser.add_argument("--output-dir", help="grid folder (default: output/ablation/GRID)")
    seeds = parser.add_mutually_exclusive_group()
    seeds.add_argument("--seeds", type=int, metavar="N",
                       help="train every cell with N seeds: train.py's --seed (given, else its default) and the "
                            "N - 1 after it; the report gives mean ± std, 95 %% intervals and paired differences "
                            "to the baseline (default: one run per cell, as train.py's seed)")
    seeds.add_argument("--seed-list", type=int, nargs="+", metavar="S",
                       help="train every cell with these seeds (instead of --seeds)")
    parser.add_argument("--baseline", metavar="LABEL",
                        help="with seeds: the cell (its label in the table, e.g. 'FL gamma=2 alpha=0.25') every "
                             "other is compared with seed by seed (default: the grid's reference setting, see "
                             "tools/ablation_grids.py BASELINES; else the first cell)")
    parser.add_argument("--data-preset", choices=sorted(PRESETS),
                        help="train on a preset of the demo data (utils/data/demo_data.py PRESETS), generated into "
                             "data/demo-PRESET on first use: adds --data-path data/demo-PRESET --recipe demo and "
                             "--min-size / --max-size at the preset's training size, unless given (sparse: 1-2 "
                             "objects of 10-16 px per 128 px image, about 1 foreground anchor in 1,200)")
    parser.add_argument("--timing-images", type=int, default=50,
                        help="validation images timed at batch 1 for ms/img, after 2 warm-up passes (default: 50)")
    parser.add_argument("--retry-failed", action="store_true", help="run failed cells again (default: keep their "
                        "result)")
    parser.add_argument("--dry-run", action="store_true", help="print every cell's train.py command and exit")
    parser.add_argument("--quiet", action="store_true",
                        help="train.py's output only to each cell's console.log, not to the terminal")
    return parser


def resolve_cell(flags: list, label: str):
    """train.py's own parser and resolve_config on ``flags``, so a bad value fails before any cell runs."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            args = train_args_parser().parse_args(flags)
    except SystemExit:
        message = stderr.getvalue().strip().splitlines()
        raise ConfigError(f"cell {label!r}: {message[-1] if message else 'invalid train.py flags'} "
                          f"(train.py {' '.join(flags)})") from None
    try:
        return resolve_config(args)
    except ConfigError as exc:
        raise ConfigError(f"cell {label!r}: {exc}") from None


def plan_cells(args, train_args: list) -> tuple:
    """The cells to run (label, settings, train.py flags, resolved config), the budget and the
    common flags' resolved config."""
    if args.grid is None and not args.set:
        raise ConfigError("give --grid NAME or at least one --set KEY=V1,V2 (see --help)")
    reserved = [flag for flag in train_args if flag.split("=")[0] in RESERVED_FLAGS]
    if reserved:
        raise ConfigError(f"{reserved[0].split('=')[0]} is set by ablate.py for every cell; use ablate.py's "
                          "--iters / --output-dir, and re-run the same command to resume")
    base = resolve_cell(train_args, "common flags")
    iters = args.iters if args.iters is not None else DEFAULT_ITERS.get(base.recipe, DEFAULT_ITERS["coco"])
    if iters < 1:
        raise ConfigError(f"--iters {iters}: must be >= 1")
    settings = combine(grid_cells(args.grid, base.recipe == "demo") if args.grid else [], parse_set(args.set or []))
    cells = []
    for cell in settings:
        label = cell_label(cell)
        flags = [*train_args, *cell_flags(cell), "--iters", str(iters)]
        cells.append({"label": label, "slug": cell_slug(cell), "settings": cell, "train_args": flags,
                      "config": resolve_cell(flags, label)})
    slugs = [cell["slug"] for cell in cells]
    duplicate = next((s for s in slugs if slugs.count(s) > 1), None)
    if duplicate:
        raise ConfigError(f"two cells have the same settings ({duplicate}); check --grid / --set")
    return cells, iters, base


def _given(train_args: list, flag: str) -> bool:
    return any(arg == flag or arg.startswith(flag + "=") for arg in train_args)


def preset_flags(preset: str, train_args: list) -> list:
    """The train.py flags ``--data-preset`` adds: the preset's data, the demo recipe and the
    preset's training size, each unless ``train_args`` gives it."""
    added = [] if _given(train_args, "--data-path") else ["--data-path", preset_root(preset)]
    added += [] if _given(train_args, "--recipe") else ["--recipe", "demo"]
    size = PRESETS[preset]["train_size"]
    for flag in ("--min-size", "--max-size"):
        if size is not None and not _given(train_args, flag):
            added += [flag, str(size)]
    return added


def seed_list(args, base):
    """The seeds of every cell: ``--seeds N`` from train.py's seed on, or ``--seed-list``; None without."""
    if args.seeds is not None:
        if args.seeds < 1:
            raise ConfigError(f"--seeds {args.seeds}: must be >= 1")
        return [base.seed + k for k in range(args.seeds)]
    if args.seed_list is not None:
        if len(set(args.seed_list)) != len(args.seed_list):
            raise ConfigError(f"--seed-list {' '.join(map(str, args.seed_list))}: a seed appears twice")
        return list(args.seed_list)
    if args.baseline is not None:
        raise ConfigError("--baseline names the cell the others are compared with seed by seed: give --seeds N "
                          "or --seed-list too")
    return None


def seed_runs(cell: dict, seeds: list, cell_dir: Path) -> list:
    """(run, folder) of each seed: the cell with ``seed`` and ``--seed S`` appended to its flags (a
    ``--seed`` of the common flags, the base of ``--seeds``, taken out)."""
    common, flags, index = cell["train_args"], [], 0
    while index < len(common):
        if common[index] == "--seed":
            index += 2
            continue
        if not common[index].startswith("--seed="):
            flags.append(common[index])
        index += 1
    return [({**cell, "seed": seed, "train_args": [*flags, "--seed", str(seed)]}, cell_dir / f"seed-{seed}")
            for seed in seeds]


def measure_anchor_balance(config):
    """The foreground : background anchor line of the validation data (None, with a warning, when
    the data cannot be read; train.py will say why)."""
    if config.demo_data:  # the data train.py would generate on first use, the same call
        ensure_demo_dataset(config.data_path, **config.demo_dataset())
    try:
        balance = dataset_anchor_balance(config.data_path, config.val_split, config.model, BALANCE_IMAGES)
    except UserError as exc:
        logger.warning("anchors not counted: %s", exc)
        return None
    line = format_balance(balance)
    logger.info("%s", line)
    return line


def main(argv: list) -> list:
    """``argv``: ablate.py's command line; returns the cell records (with seeds: the seeded cells of
    ``ablation_stats.seeded_cell``), empty with --dry-run."""
    args, train_args = get_args_parser().parse_known_args(argv)
    added = preset_flags(args.data_preset, train_args) if args.data_preset else []
    train_args = [*added, *train_args]
    cells, iters, base = plan_cells(args, train_args)
    seeds = seed_list(args, base)
    if seeds and any("seed" in cell["settings"] for cell in cells):
        raise ConfigError("--set seed=... and --seeds / --seed-list both choose the seeds; use one of them")
    baseline = baseline_index([cell["settings"] for cell in cells], args.grid, base.recipe == "demo",
                              args.baseline) if seeds else None
    name = args.grid or "custom"
    output_dir = Path(args.output_dir or Path("output") / "ablation" / name)
    plan = [seed_runs(cell, seeds, output_dir / "cells" / cell["slug"]) if seeds
            else [(cell, output_dir / "cells" / cell["slug"])] for cell in cells]
    if args.dry_run:  # in the order they run: seed by seed
        for seed_index in range(len(plan[0])):
            for run, run_dir in (row[seed_index] for row in plan):
                seed_note = f" (seed {run['seed']})" if seeds else ""
                print(f"{run['label']}{seed_note}:")
                print(f"  python train.py {' '.join(run['train_args'])} --output-dir {run_dir} --resume auto")
        return []
    output_dir.mkdir(parents=True, exist_ok=True)
    setup_logging(str(output_dir), "ablate.log")
    if cells[0]["config"].num_threads:
        torch.set_num_threads(cells[0]["config"].num_threads)
    if "--data-path" in added:
        ensure_demo_dataset(preset_root(args.data_preset), preset=args.data_preset, show_progress=not args.quiet)
    grid = {"name": name, "description": GRIDS[args.grid][0] if args.grid else f"--set {' --set '.join(args.set)}",
            "command": "python tools/ablate.py " + " ".join(shlex.quote(a) for a in argv), "iters": iters,
            "common_args": train_args, "anchor_balance": measure_anchor_balance(base)}
    if seeds:
        grid.update(seeds=seeds, baseline=cells[baseline]["label"])
    # Before any training: every run already in output_dir must have been started with the same flags.
    records = [[read_record(run_dir, run) or {"label": run["label"], "settings": run["settings"],
                                              **({"seed": run["seed"]} if seeds else {})}
                for run, run_dir in row] for row in plan]
    logger.info("%d cells x %d seeds of %d iterations each in %s", len(cells), len(seeds or [None]), iters, output_dir)

    def report() -> list:
        if not seeds:
            report_cells = [row[0] for row in records]
        else:
            report_cells = [seeded_cell(cell, row, None if index == baseline else records[baseline], COLUMNS)
                            for index, (cell, row) in enumerate(zip(cells, records))]
        write_report(output_dir, grid, report_cells)
        return report_cells

    # Seed by seed: a grid stopped early holds every cell at the first seeds, ready to compare.
    for seed_index in range(len(seeds or [None])):
        for index, cell in enumerate(cells):
            run, run_dir = plan[index][seed_index]
            seed_note = f" seed {run['seed']} ({seed_index + 1}/{len(seeds)})" if seeds else ""
            logger.info("cell %d/%d%s: %s", index + 1, len(cells), seed_note, cell["label"])
            records[index][seed_index] = run_cell(run, run_dir, retry_failed=args.retry_failed, echo=not args.quiet,
                                                  timing_images=args.timing_images, time_inference=seed_index == 0)
            report()
    logger.info("table: %s", output_dir / "ablation.md")
    return report()


if __name__ == "__main__":
    exit_on_user_error(main, sys.argv[1:])

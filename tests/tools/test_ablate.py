"""tools/ablate.py: grids, the flags each cell gets, and a two-cell grid end to end (then re-run: skipped)."""
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from utils.data.demo_data import PRESETS, generate_demo_dataset
from utils.runtime.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))

import ablation_grids  # noqa: E402
from ablation_grids import GRIDS, cell_flags, cell_label, cell_slug, combine, parse_set  # noqa: E402
import ablation_report  # noqa: E402
import ablation_stats  # noqa: E402


def load_ablate():
    spec = importlib.util.spec_from_file_location("ablate_under_test", REPO / "tools" / "ablate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ablate = load_ablate()

TINY_TRAIN = ["--train-split", "train", "--val-split", "val", "--workers", "0", "--batch-size", "4",
              "--optimizer", "adamw", "--lr", "1e-3", "--warmup-iters", "1", "--schedule", "cosine",
              "--print-freq", "1", "--num-threads", "1", "--backbone", "resnet18", "--pretrained-backbone", "none",
              "--fpn-channels", "32", "--head-convs", "1", "--head-norm", "gn", "--num-extra-levels", "1",
              "--anchor-base-sizes", "16", "32", "64", "128", "--min-size", "64", "--max-size", "64",
              "--ohem-batch", "32"]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ablate_coco")
    generate_demo_dataset(root, num_train=8, num_val=3, image_size=64, seed=2, show_progress=False)
    return str(root)


def test_set_axes_multiply_and_lists_become_several_values():
    cells = parse_set(["focal-gamma=0,2", "aspect_ratios=1,0.5 1 2"])
    several = ["0.5", "1", "2"]
    assert cells == [{"focal_gamma": "0", "aspect_ratios": "1"}, {"focal_gamma": "0", "aspect_ratios": several},
                     {"focal_gamma": "2", "aspect_ratios": "1"}, {"focal_gamma": "2", "aspect_ratios": several}]
    assert cell_flags(cells[1]) == ["--focal-gamma", "0", "--aspect-ratios", "0.5", "1", "2"]
    assert combine([{"cls_loss": "ce"}, {"cls_loss": "focal"}], [{"seed": "1"}, {"seed": "2"}]) == [
        {"cls_loss": "ce", "seed": "1"}, {"cls_loss": "ce", "seed": "2"},
        {"cls_loss": "focal", "seed": "1"}, {"cls_loss": "focal", "seed": "2"}]
    for bad in (["focal_gamma"], ["=1,2"], ["focal_gamma=1,,2"], ["Bad Key=1"]):
        with pytest.raises(ConfigError, match="--set"):
            parse_set(bad)


def test_help_lists_every_grid():
    text = ablate.get_args_parser().format_help()
    assert all(name in text for name in GRIDS) and "--timing-images" in text


def test_labels_and_folder_names_identify_a_cell():
    cell = {"cls_loss": "ohem", "ohem_batch": 128, "ohem_nms_thresh": 0.5, "ohem_fg_ratio": 0.25}
    assert cell_label(cell) == "OHEM batch=128 nms=0.5 fg=0.25"
    assert cell_slug(cell) == "cls_loss=ohem__ohem_batch=128__ohem_nms_thresh=0.5__ohem_fg_ratio=0.25"
    assert cell_label({"scales_per_octave": 2, "aspect_ratios": [0.5, 1.0, 2.0]}) == "scales=2 ratios=0.5,1,2"


@pytest.mark.parametrize("grid", sorted(GRIDS))
def test_every_built_in_grid_resolves_with_train_py(grid, capsys):
    assert ablate.main(["--grid", grid, "--dry-run"]) == []
    printed = capsys.readouterr().out
    cells = ablation_grids.grid_cells(grid, demo=True)
    assert len(cells) >= 4 and printed.count("python train.py") == len(cells)
    assert printed.count("--iters 1000") == len(cells)  # the demo budget, the same for every cell
    if grid == "gamma":
        assert "--focal-gamma 5 --focal-alpha 0.25" in printed and "--focal-gamma 0.5 --focal-alpha 0.5" in printed
    if grid == "ohem":
        assert printed.count("--cls-loss ohem") == 9 and "--ohem-fg-ratio 0.25" in printed


@pytest.mark.parametrize("argv,message", [
    ([], "give --grid"), (["--grid", "loss", "--epochs", "3"], "--epochs is set by ablate.py"),
    (["--set", "focal_alpha=0.5,2"], "cell 'alpha=2'.*focal_alpha must be < 1"),
    (["--set", "cls_loss=hinge"], "invalid choice: 'hinge'"),
    (["--set", "cls_loss=ce,ce"], "same settings"),
])
def test_bad_grids_fail_before_any_training(argv, message):
    with pytest.raises(ConfigError, match=message):
        ablate.main([*argv, "--dry-run"])


@pytest.mark.slow
def test_two_cells_end_to_end_then_a_rerun_skips_them(tiny_data, tmp_path, caplog):
    out = tmp_path / "grid"
    argv = ["--set", "cls_loss=focal,ohem", "--iters", "2", "--output-dir", str(out), "--timing-images", "2",
            "--quiet", "--data-path", tiny_data, *TINY_TRAIN]
    records = ablate.main(argv)
    assert [r["status"] for r in records] == ["done", "done"] and [r["label"] for r in records] == ["FL", "OHEM"]
    table = (out / "ablation.md").read_text()
    assert "| setting | AP | AP50 | AP75 | APs | APm | APl | iterations | train img/s | ms/img |" in table
    for record, slug in zip(records, ("cls_loss=focal", "cls_loss=ohem")):
        # Each figure is the cell's own: its evaluation's metrics.json, its training log's iterations
        # and median speed (the first logged iteration includes start-up), and the table shows them.
        evaluated = json.loads((out / "cells" / slug / "eval_val" / "metrics.json").read_text())
        assert record["metrics"] == {k: v for k, v in evaluated.items() if k != "per_category"}
        logged = [json.loads(line) for line in (out / "cells" / slug / "log.jsonl").read_text().splitlines()]
        speeds = [r["images_per_s"] for r in logged if r["type"] == "train"]
        assert record["iterations"] == 2 and record["train_images_per_s"] == speeds[-1]  # the median of one
        assert record["inference_ms_per_image"] > 0
        percent = ["n/a" if record["metrics"][k] is None else f"{100 * record['metrics'][k]:.1f}"
                   for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")]
        assert (f"| {record['label']} | {' | '.join(percent)} | 2 | {record['train_images_per_s']:.1f} | "
                f"{record['inference_ms_per_image']:.1f} |") in table.splitlines()
    assert "2 of 2 cells done" in table
    summary = json.loads((out / "ablation.json").read_text())
    assert summary["iters"] == 2 and summary["cells"] == records
    plot = Image.open(out / "ablation.png")  # AP and AP50 bars of both cells
    assert plot.format == "PNG" and 500 < plot.size[0] < 900 and 150 < plot.size[1] < 300
    cell_dir = out / "cells" / "cls_loss=ohem"
    checkpoint = json.loads((cell_dir / "cell.json").read_text())["train_args"]
    assert "--cls-loss" in checkpoint and checkpoint[-2:] == ["--iters", "2"]

    stamps = {p: p.stat().st_mtime_ns for p in (out / "cells").rglob("*") if p.is_file()}
    assert len(stamps) > 10
    caplog.clear()
    with caplog.at_level("INFO", logger="ablate"):
        again = ablate.main(argv)
    assert again == records
    assert caplog.text.count("done before, skipped") == 2
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing trained, evaluated or rewritten

    # The same folder with another budget is refused before anything runs, not mixed into the table.
    with pytest.raises(ConfigError, match="holds a cell run with other flags"):
        ablate.main([*argv[:3], "3", *argv[4:]])


def test_report_rows_and_bars_show_each_cell(tmp_path):
    metrics = {"AP": 0.2, "AP50": 0.6, "AP75": 0.15, "APs": None, "APm": 0.25, "APl": 0.5}
    cells = [{"label": "FL", "status": "done", "metrics": metrics, "iterations": 100, "train_images_per_s": 12.34,
              "inference_ms_per_image": 5.06},
             {"label": "CE", "status": "done", "metrics": dict(metrics, AP=0.1, AP50=0.3), "iterations": 100,
              "train_images_per_s": 11.0, "inference_ms_per_image": 5.0},
             {"label": "OHEM", "status": "failed", "error": "out of memory"}, {"label": "BCE"}]
    grid = {"name": "loss", "description": "d", "command": "c", "iters": 100, "common_args": []}
    ablation_report.write_report(tmp_path, grid, cells)
    rows = (tmp_path / "ablation.md").read_text().splitlines()
    assert "| FL | 20.0 | 60.0 | 15.0 | n/a | 25.0 | 50.0 | 100 | 12.3 | 5.1 |" in rows
    assert "| CE | 10.0 | 30.0 | 15.0 | n/a | 25.0 | 50.0 | 100 | 11.0 | 5.0 |" in rows
    assert "| OHEM | failed: out of memory |" + "  |" * 8 in rows and "| BCE | not run yet |" + "  |" * 8 in rows
    assert "2 of 4 cells done." in rows
    assert json.loads((tmp_path / "ablation.json").read_text())["cells"] == cells
    # The two done cells as bars: AP in blue, AP50 in orange, three times as long (0.6 / 0.2, 0.3 / 0.1).
    pixels = np.asarray(Image.open(tmp_path / "ablation.png").convert("RGB")).astype(int)
    blue, orange = ((np.abs(pixels - np.array(c)).max(axis=-1) < 24) for c in ((31, 119, 180), (255, 127, 14)))
    blue_bars, orange_bars = (mask.sum(axis=1)[mask.sum(axis=1) > 20] for mask in (blue, orange))  # rows of a bar
    assert len(blue_bars) > 10 and len(orange_bars) > 10
    assert np.median(orange_bars) == pytest.approx(3 * np.median(blue_bars), rel=0.15)


def test_a_failing_cell_is_recorded_and_the_grid_goes_on(tiny_data, tmp_path):
    out = tmp_path / "grid"
    records = ablate.main(["--set", "train_split=missing_split", "--iters", "1", "--output-dir", str(out), "--quiet",
                           "--data-path", tiny_data, *TINY_TRAIN])
    assert records[0]["status"] == "failed" and "missing_split" in records[0]["error"]
    assert "failed: " in (out / "ablation.md").read_text()
    assert os.path.isfile(out / "cells" / "train_split=missing_split" / "console.log")


def test_seeds_and_presets_in_the_commands(capsys):
    assert ablate.main(["--grid", "imbalance", "--seeds", "2", "--seed", "7", "--data-preset", "sparse",
                        "--dry-run"]) == []
    printed = capsys.readouterr().out.splitlines()
    commands = [line for line in printed if "python train.py" in line]
    assert len(commands) == 12 and printed[0] == "alpha-CE alpha=0.25 (seed 7):"  # 6 cells x 2 seeds, seed by seed
    assert [c.split("--seed ")[1].split()[0] for c in commands] == ["7"] * 6 + ["8"] * 6
    size = PRESETS["sparse"]["train_size"]
    assert all(c.count("--seed") == 1 and f"--data-path data/demo-sparse --recipe demo --min-size {size} "
               f"--max-size {size}" in c for c in commands)
    assert "cells/cls_loss=focal__focal_gamma=5__focal_alpha=0.25/seed-8 --resume auto" in commands[-1]
    # What the user gives wins over the preset's flags.
    ablate.main(["--set", "cls_loss=ce", "--data-preset", "sparse", "--min-size", "96", "--dry-run"])
    command = capsys.readouterr().out.splitlines()[1]
    assert "--min-size 96" in command and "--min-size 128" not in command and f"--max-size {size}" in command


@pytest.mark.parametrize("argv,message", [
    (["--grid", "loss", "--seeds", "0"], "--seeds 0: must be >= 1"),
    (["--grid", "loss", "--seed-list", "1", "2", "1"], "a seed appears twice"),
    (["--grid", "loss", "--baseline", "CE"], "give --seeds N or --seed-list"),
    (["--grid", "loss", "--seeds", "2", "--baseline", "FL"], "--baseline 'FL' is none of the cells"),
    (["--set", "seed=1,2", "--seeds", "2"], "both choose the seeds"),
])
def test_bad_seed_options_fail_before_any_training(argv, message):
    with pytest.raises(ConfigError, match=message):
        ablate.main([*argv, "--dry-run"])


def test_every_grid_has_its_baseline():
    expected = {"loss": "FL gamma=2 alpha=0.25", "ohem": "FL gamma=2 alpha=0.25", "alpha-ce": "alpha-CE alpha=0.75",
                "gamma": "FL gamma=0 alpha=0.75", "imbalance": "alpha-CE alpha=0.75",
                "anchors": "scales=3 ratios=0.5,1,2", "scale": "size=128 max=213"}
    for grid, label in expected.items():
        cells = ablation_grids.grid_cells(grid, demo=True)
        assert cell_label(cells[ablation_grids.baseline_index(cells, grid, demo=True)]) == label
    cells = parse_set(["focal_gamma=0,2"])  # a free grid: the first cell, or the one named
    assert ablation_grids.baseline_index(cells, None, demo=True) == 0
    assert ablation_grids.baseline_index(cells, None, demo=True, label="gamma=2") == 1


# Per-seed results the fast test writes as finished runs: (AP, AP50) per (cell, seed).
SEEDED = {("focal", 3): (0.30, 0.50), ("focal", 5): (0.34, 0.52), ("ce", 3): (0.20, 0.40), ("ce", 5): (0.26, 0.43)}
T_1 = 12.706  # Student's t, 0.975 quantile, 1 degree of freedom (two seeds)


def test_finished_seeds_are_skipped_and_summarised_by_hand(tiny_data, tmp_path, caplog):
    out = tmp_path / "grid"
    common = ["--data-path", tiny_data, *TINY_TRAIN]
    for (loss, seed), (ap, ap50) in SEEDED.items():
        run_dir = out / "cells" / f"cls_loss={loss}" / f"seed-{seed}"
        run_dir.mkdir(parents=True)
        metrics = {"AP": ap, "AP50": ap50, "AP75": 0.1, "APs": None, "APm": 0.2, "APl": 0.3}
        (run_dir / "cell.json").write_text(json.dumps({
            "label": {"focal": "FL", "ce": "CE"}[loss], "settings": {"cls_loss": loss}, "seed": seed,
            "train_args": [*common, "--cls-loss", loss, "--iters", "2", "--seed", str(seed)], "status": "done",
            "metrics": metrics, "iterations": 2, "train_images_per_s": float(seed),
            "inference_ms_per_image": 4.0 if seed == 3 else None}))
    with caplog.at_level("INFO", logger="ablate"):
        cells = ablate.main(["--set", "cls_loss=focal,ce", "--seed-list", "3", "5", "--baseline", "CE", "--iters", "2",
                             "--output-dir", str(out), "--quiet", *common])
    assert caplog.text.count("done before, skipped") == 4 and not list(out.rglob("console.log"))  # no train.py ran
    assert "foreground anchors 1 : " in caplog.text

    summary = json.loads((out / "ablation.json").read_text())
    assert summary["seeds"] == [3, 5] and summary["baseline"] == "CE"
    fl, ce = summary["cells"]
    assert fl["stats"]["AP"]["values"] == {"3": 0.30, "5": 0.34}  # the per-seed values
    # By hand: FL AP 0.30, 0.34: mean 0.32, std sqrt((0.02^2 + 0.02^2) / 1) = 0.02828, half width
    # t * std / sqrt(2) = 12.706 * 0.02.
    assert fl["stats"]["AP"]["mean"] == pytest.approx(0.32) and fl["stats"]["AP"]["std"] == pytest.approx(
        math.sqrt(0.0008))
    assert fl["stats"]["AP"]["ci"] == pytest.approx([0.32 - T_1 * 0.02, 0.32 + T_1 * 0.02], abs=1e-4)
    # Paired FL - CE: AP 0.10, 0.08 (mean 0.09, std 0.01414, half width 12.706 * 0.01 = 0.127: holds 0);
    # AP50 0.10, 0.09 (mean 0.095, std 0.00707, half width 0.0635: excludes 0).
    paired_ap, paired_ap50 = fl["stats"]["AP"]["paired"], fl["stats"]["AP50"]["paired"]
    assert paired_ap["mean"] == pytest.approx(0.09) and paired_ap["std"] == pytest.approx(math.sqrt(0.0002))
    assert paired_ap["ci"] == pytest.approx([0.09 - 0.12706, 0.09 + 0.12706], abs=1e-4)
    assert paired_ap["significant"] is False and paired_ap50["significant"] is True
    assert paired_ap50["ci"] == pytest.approx([0.095 - 0.06353, 0.095 + 0.06353], abs=1e-4)
    assert ce["stats"]["AP"]["paired"] is None and fl["stats"]["APs"]["n"] == 0
    assert fl["train_images_per_s"] == 4.0 and fl["inference_ms_per_image"] == 4.0  # median of 3, 5; first seed's
    assert summary["cells"] == json.loads(json.dumps(cells))

    rows = (out / "ablation.md").read_text().splitlines()
    assert "| FL | 2 | 32.0 ± 2.8 | 51.0 ± 1.4 | 10.0 ± 0.0 | n/a | 20.0 ± 0.0 | 30.0 ± 0.0 | [6.6, 57.4] | " \
           "+9.0 [-3.7, 21.7] | 4.0 | 4.0 |" in rows
    assert "| CE | 2 | 23.0 ± 4.2 | 41.5 ± 2.1 | 10.0 ± 0.0 | n/a | 20.0 ± 0.0 | 30.0 ± 0.0 | [-15.1, 61.1] | " \
           "baseline | 4.0 | 4.0 |" in rows
    assert "| FL | 2 | +9.0 [-3.7, 21.7] | +9.5 [3.1, 15.9] * | +0.0 [0.0, 0.0] | n/a | +0.0 [0.0, 0.0] | " \
           "+0.0 [0.0, 0.0] |" in rows
    assert "4 of 4 runs (2 cells x 2 seeds) done." in rows
    assert any(row.startswith("Data: foreground anchors 1 : ") for row in rows)
    assert Image.open(out / "ablation.png").format == "PNG"


def test_seeded_report_of_partial_and_single_seeds(tmp_path):
    def run(seed, ap, status="done"):
        return {"seed": seed, "status": status, "metrics": {k: ap for k in ablation_report.COLUMNS}}
    runs = {"FL": [run(1, 0.3), run(2, 0.2, "failed")], "CE": [run(1, 0.25), {"seed": 2}], "BCE": [{"seed": 1}]}
    cells = [ablation_stats.seeded_cell({"label": label, "settings": {}}, rows, None if label == "CE" else runs["CE"],
                                        ablation_report.COLUMNS) for label, rows in runs.items()]
    grid = {"name": "loss", "description": "d", "command": "c", "iters": 9, "common_args": [], "seeds": [1, 2],
            "baseline": "CE"}
    ablation_report.write_report(tmp_path, grid, cells)
    rows = (tmp_path / "ablation.md").read_text().splitlines()
    # One seed: no spread, no interval ("-"); the difference to the baseline is shown without one.
    assert "| FL | 1 | " + "30.0 ± - | " * 6 + "- | +5.0 - | n/a | n/a |" in rows
    assert "| BCE | not run yet |" + "  |" * 10 in rows
    assert "- FL, seed 2: failed: ?" in rows and "- CE, seed 2: not run yet" in rows
    assert "2 of 6 runs (3 cells x 2 seeds) done." in rows


@pytest.mark.slow
def test_two_cells_two_seeds_end_to_end_with_an_interrupted_seed(tiny_data, tmp_path, caplog):
    out = tmp_path / "grid"
    common = ["--data-path", tiny_data, *TINY_TRAIN]
    argv = ["--set", "cls_loss=focal,ce", "--seeds", "2", "--seed", "11", "--iters", "2", "--output-dir", str(out),
            "--timing-images", "2", "--quiet", *common]
    # FL seed 12 was stopped after its first iteration in an earlier sitting: checkpoint, "running" record.
    interrupted = out / "cells" / "cls_loss=focal" / "seed-12"
    interrupted.mkdir(parents=True)
    flags = [*common, "--cls-loss", "focal", "--iters", "2", "--seed", "12"]
    subprocess.run([sys.executable, str(REPO / "train.py"), *flags, "--output-dir", str(interrupted),
                    "--max-iters", "1"], check=True, capture_output=True)
    assert list(interrupted.glob("checkpoint_*.pth")) and not (interrupted / "model_final.pth").exists()
    (interrupted / "cell.json").write_text(json.dumps({"label": "FL", "settings": {"cls_loss": "focal"}, "seed": 12,
                                                       "train_args": flags, "status": "running"}))

    cells = ablate.main(argv)
    assert "resumed at epoch" in (interrupted / "console.log").read_text()
    records = {(cell["label"], run["seed"]): run for cell in cells for run in cell["runs"]}
    assert set(records) == {("FL", 11), ("FL", 12), ("CE", 11), ("CE", 12)}
    for (label, seed), run in records.items():
        # Each seed's figures are its own evaluation's, and it trained the full budget with its seed.
        run_dir = out / "cells" / f"cls_loss={'focal' if label == 'FL' else 'ce'}" / f"seed-{seed}"
        assert json.loads((run_dir / "cell.json").read_text()) == run
        evaluated = json.loads((run_dir / "eval_val" / "metrics.json").read_text())
        assert run["metrics"] == {k: v for k, v in evaluated.items() if k != "per_category"}
        assert run["status"] == "done" and run["iterations"] == 2 and run["train_args"][-2:] == ["--seed", str(seed)]
        assert (run["inference_ms_per_image"] is None) == (seed == 12)  # timed on the first seed only

    # The statistics come from these records (two toy iterations give AP 0, so the figures themselves are
    # checked by hand in test_finished_seeds_are_skipped_and_summarised_by_hand).
    summary = json.loads((out / "ablation.json").read_text())
    assert summary["baseline"] == "FL" and summary["seeds"] == [11, 12]  # a free grid: the first cell
    stats = summary["cells"][1]["stats"]["AP50"]
    assert stats["values"] == {str(seed): records[("CE", seed)]["metrics"]["AP50"] for seed in (11, 12)}
    assert stats["n"] == 2 and stats["paired"]["seeds"] == [11, 12]
    assert summary["cells"][0]["stats"]["AP"]["paired"] is None

    # Run again: every seed is finished, nothing trains, evaluates or rewrites a file.
    stamps = {p: p.stat().st_mtime_ns for p in (out / "cells").rglob("*") if p.is_file()}
    caplog.clear()
    with caplog.at_level("INFO", logger="ablate"):
        assert ablate.main(argv) == cells
    assert caplog.text.count("done before, skipped") == 4
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps

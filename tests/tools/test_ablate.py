"""tools/ablate.py: grids, the flags each cell gets, and a two-cell grid end to end (then re-run: skipped)."""
import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from utils.data.demo_data import generate_demo_dataset
from utils.runtime.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))

import ablation_grids  # noqa: E402
from ablation_grids import GRIDS, cell_flags, cell_label, cell_slug, combine, parse_set  # noqa: E402
import ablation_report  # noqa: E402


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

"""The paper's figures: tools/plot_focal_loss.py (Figure 1), tools/show_features.py, tools/loss_distribution.py
(Figure 4) write their PNG and JSON; without matplotlib each says so in one line."""
import argparse
import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model import build_retinanet
from utils.data.demo_data import generate_demo_dataset
from utils.runtime.checkpoint import save_checkpoint
from utils.runtime.errors import exit_on_user_error

REPO = Path(__file__).resolve().parents[2]
TINY = dict(backbone="resnet18", fpn_channels=32, head_convs=1, head_norm="gn", num_extra_levels=1,
            anchor_base_sizes=(16, 32, 64, 128), min_size=64, max_size=64)


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_under_test", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


plot_focal_loss, show_features, loss_distribution = (load_tool(name) for name in
                                                     ("plot_focal_loss", "show_features", "loss_distribution"))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """An untrained tiny model with a data path in its args, as train.py saves them."""
    root = tmp_path_factory.mktemp("figures")
    data = root / "data"
    generate_demo_dataset(data, num_train=2, num_val=3, image_size=64, seed=4, show_progress=False)
    categories = json.loads((data / "annotations" / "instances_val.json").read_text())["categories"]
    model = build_retinanet(num_classes=len(categories), **TINY)
    path = root / "model_final.pth"
    save_checkpoint({"model": model.state_dict(), "model_config": model.config,
                     "categories": [{"id": c["id"], "name": c["name"]} for c in categories],
                     "args": {"data_path": str(data), "val_split": "val"}}, str(path))
    return path, data


def parse(tool, argv):
    return tool.get_args_parser().parse_args(argv)


# matplotlib's first two line colours (tab:blue, tab:orange) and the anchors' tab:cyan.
BLUE, ORANGE, CYAN = (31, 119, 180), (255, 127, 14), (23, 190, 207)


def assert_drawn(path: Path, figsize: tuple, colours=(), min_colour_pixels: int = 150) -> np.ndarray:
    """``path`` is a PNG of about ``figsize`` inches at 100 dpi (``bbox_inches="tight"`` trims or adds a
    margin), with ink on it and at least ``min_colour_pixels`` pixels of each of ``colours`` (its curves,
    its boxes); returns its ``[H, W, 3]`` pixels."""
    image = Image.open(path)
    assert image.format == "PNG"
    width, height = image.size
    assert 0.6 * figsize[0] * 100 < width < 1.3 * figsize[0] * 100, image.size
    assert 0.6 * figsize[1] * 100 < height < 1.3 * figsize[1] * 100, image.size
    pixels = np.asarray(image.convert("RGB")).astype(int)
    assert (pixels.min(axis=-1) < 200).mean() > 0.02  # not a blank canvas
    for colour in colours:
        close = (np.abs(pixels - np.array(colour)).max(axis=-1) < 24).sum()
        assert close >= min_colour_pixels, (colour, close)
    return pixels


def test_figure_1_is_the_focal_loss_of_losses_focal_loss(tmp_path):
    out = tmp_path / "fig1.png"
    plot_focal_loss.main(parse(plot_focal_loss, ["--output", str(out), "--gammas", "0", "2", "--points", "99"]))
    assert_drawn(out, (6, 4.5), colours=(BLUE, ORANGE))  # one curve per gamma
    numbers = json.loads(out.with_suffix(".json").read_text())
    assert set(numbers["loss"]) == {"0", "2"} and len(numbers["p_t"]) == 99
    p_t, ce, focal = numbers["p_t"][49], numbers["loss"]["0"][49], numbers["loss"]["2"][49]
    assert p_t == pytest.approx(0.5)
    assert ce == pytest.approx(math.log(2)) and focal == pytest.approx(0.25 * math.log(2))  # -(1-p)^2 log p


def test_show_features_writes_one_png_with_every_level(checkpoint, tmp_path):
    path, data = checkpoint
    image = sorted((data / "val").glob("*.jpg"))[0]
    out = tmp_path / "features.png"
    show_features.main(parse(show_features, ["--checkpoint", str(path), "--image", str(image), "--output", str(out),
                                             "--score-thresh", "0.005"]))
    pixels = assert_drawn(out, (9, 3 * 5), colours=(CYAN,))  # the image, then one row per level; anchors in cyan
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 1000  # the colour-mapped feature and score maps
    summary = json.loads(out.with_suffix(".json").read_text())
    assert [level["level"] for level in summary["levels"]] == ["P3", "P4", "P5", "P6"]
    assert [level["stride"] for level in summary["levels"]] == [8, 16, 32, 64]
    # With the prior (0.01) every anchor of the untrained model scores about 0.01 > 0.005: all fire.
    assert [level["anchors_firing"] for level in summary["levels"]] == [64 * 9, 16 * 9, 4 * 9, 1 * 9]


def test_loss_distribution_writes_cumulative_curves_per_gamma(checkpoint, tmp_path):
    path, _ = checkpoint
    out = tmp_path / "figure4.png"
    loss_distribution.main(parse(loss_distribution, ["--checkpoint", str(path), "--gammas", "0", "2",
                                                     "--output", str(out), "--max-images", "3"]))
    pixels = assert_drawn(out, (11, 4.5), colours=(BLUE, ORANGE))  # a curve per gamma
    # A curve in each panel (positives left, negatives right); gamma 2's is drawn last, on top.
    for half in (pixels[:, :pixels.shape[1] // 2], pixels[:, pixels.shape[1] // 2:]):
        assert (np.abs(half - np.array(ORANGE)).max(axis=-1) < 24).sum() >= 150
    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary["split"] == "val" and summary["images"] == 3 and set(summary["gammas"]) == {"0", "2"}
    for kind in ("positive", "negative"):
        counts = {summary["gammas"][g][kind]["count"] for g in ("0", "2")}
        assert len(counts) == 1 and counts.pop() > 0  # the same anchors for every gamma
        for gamma in ("0", "2"):
            cdf = summary["gammas"][gamma][kind]["cdf"]
            assert len(cdf) == 101 and cdf[0] == 0 and cdf[-1] == pytest.approx(1)
            assert all(b >= a - 1e-12 for a, b in zip(cdf, cdf[1:]))  # sorted ascending: a convex, rising curve
    # Focusing moves the negatives' loss onto the hardest ones (the paper's Figure 4, right).
    negative = {g: summary["gammas"][g]["negative"]["hardest_20pct_share"] for g in ("0", "2")}
    assert negative["2"] > negative["0"]


@pytest.mark.parametrize("tool,argv", [
    ("plot_focal_loss", ["--output", "{tmp}/x.png"]),
    ("show_features", ["--checkpoint", "{ckpt}", "--image", "{image}", "--output", "{tmp}/x.png"]),
    ("loss_distribution", ["--checkpoint", "{ckpt}", "--output", "{tmp}/x.png"]),
])
def test_without_matplotlib_each_tool_says_so_in_one_line(tool, argv, checkpoint, tmp_path, monkeypatch, capsys):
    path, data = checkpoint
    image = sorted((data / "val").glob("*.jpg"))[0]
    argv = [a.format(tmp=tmp_path, ckpt=path, image=image) for a in argv]
    module = {"plot_focal_loss": plot_focal_loss, "show_features": show_features,
              "loss_distribution": loss_distribution}[tool]
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with pytest.raises(SystemExit) as exit_info:
        exit_on_user_error(module.main, parse(module, argv))
    message = str(exit_info.value.code)
    assert message.startswith("error: matplotlib is not installed") and "pip install matplotlib" in message
    assert "\n" not in message and not list(tmp_path.iterdir())  # nothing written


def test_the_ablation_plot_is_skipped_with_a_warning_without_matplotlib(tmp_path, monkeypatch, caplog):
    sys.path.insert(0, str(REPO / "tools"))
    import ablation_report
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    cells = [{"label": "FL", "status": "done", "metrics": {"AP": 0.3, "AP50": 0.5}, "inference_ms_per_image": 1.0}]
    grid = {"name": "loss", "iters": 1}
    with caplog.at_level("WARNING"):
        assert ablation_report.plot_ablation(tmp_path / "a.png", grid, cells) is False
    assert "matplotlib is not installed" in caplog.text and not (tmp_path / "a.png").exists()


def test_args_parsers_document_every_option():
    for module in (plot_focal_loss, show_features, loss_distribution):
        parser = module.get_args_parser()
        assert isinstance(parser, argparse.ArgumentParser)
        assert all(action.help for action in parser._actions)
        assert "usage" in parser.format_help()

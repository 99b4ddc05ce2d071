"""Training curves: utils/visual/training_curves.py, tools/plot_logs.py, and the curves.png train.py writes at the end."""
import importlib.util
import json

import pytest
from PIL import Image

from forked_scripts import REPO, run_forked
from test_train import train_command
from utils.data.demo_data import generate_demo_dataset
from utils.runtime.errors import UserError
from utils.visual.training_curves import LogFileError, plot_runs, read_log, summary_lines, unique_labels


def load_tool():
    spec = importlib.util.spec_from_file_location("plot_logs", f"{REPO}/tools/plot_logs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def train_record(iteration, loss, lr=0.01):
    return {"type": "train", "epoch": 1, "iteration": iteration, "lr": lr, "loss": loss,
            "classification": 0.75 * loss, "bbox_regression": 0.25 * loss, "images_per_s": 10.0 + iteration}


def write_log(path, records, tail=""):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    return path


def assert_png(path, size=(1500, 850)):
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == size
        colours = image.convert("L").getextrema()
    assert colours[0] < 100 < colours[1]  # lines drawn on a white background, not a blank canvas


def test_read_log_keeps_the_later_record_of_a_resumed_iteration(tmp_path, caplog):
    records = [train_record(10, 2.0), train_record(20, 1.5), {"type": "eval", "epoch": 1, "iteration": 20,
                                                               "AP": 0.1, "AP50": 0.2},
               train_record(30, 1.4),
               # resumed from the checkpoint at iteration 20: iteration 30 again, then on
               train_record(30, 1.2), train_record(40, 1.0), {"type": "eval", "epoch": 2, "iteration": 40,
                                                              "AP": 0.3, "AP50": None}]
    path = write_log(tmp_path / "run_a" / "log.jsonl", records, tail='{"type": "train", "iter')  # killed mid-line
    run = read_log(tmp_path / "run_a")  # a run folder works as well as the file
    assert run.label == "run_a" and run.num_unreadable == 1 and "skipped 1 unreadable" in caplog.text
    assert run.series("loss") == ([10, 20, 30, 40], [2.0, 1.5, 1.2, 1.0])
    assert run.series("images_per_s") == ([10, 20, 30, 40], [20.0, 30.0, 40.0, 50.0])
    assert run.series("AP", "eval") == ([20, 40], [0.1, 0.3])
    assert run.series("AP50", "eval") == ([20], [0.2])  # null (no ground truth) is left out, not drawn as 0
    assert summary_lines([run]) == ["run_a: 40 iterations, last loss 1.0000, last AP 0.3000, best AP 0.3000 "
                                    "at iteration 40"]
    assert read_log(path, "mine").label == "mine"


def test_unusable_logs_are_one_line_errors(tmp_path):
    with pytest.raises(LogFileError, match=r"training log .*nowhere/log\.jsonl not found"):
        read_log(tmp_path / "nowhere" / "log.jsonl")
    with pytest.raises(LogFileError, match=r"holds no training or evaluation record \(2 unreadable lines\)"):
        read_log(write_log(tmp_path / "bad.jsonl", [], tail="not json\n[1, 2]\n"))
    assert isinstance(LogFileError("x"), UserError)


def test_two_runs_in_one_png(tmp_path, monkeypatch):
    a = write_log(tmp_path / "exp1" / "sgd" / "log.jsonl", [train_record(i, 3.0 / i) for i in range(1, 40)])
    b = write_log(tmp_path / "exp2" / "sgd" / "log.jsonl", [train_record(i, 2.0 / i, lr=0.02) for i in range(1, 9)]
                  + [{"type": "eval", "epoch": 1, "iteration": 8, "AP": 0.25, "AP50": 0.5}])
    assert unique_labels([a, b]) == ["exp1/sgd", "exp2/sgd"]  # the folder names alone would clash
    runs = [read_log(a, "A"), read_log(b, "B")]
    assert_png(plot_runs(runs, tmp_path / "out" / "cmp.png"))

    tool = load_tool()
    monkeypatch.chdir(tmp_path)  # several runs go to ./curves.png
    written = tool.main(tool.get_args_parser().parse_args([str(a), str(b.parent)]))
    assert written.resolve() == tmp_path / "curves.png"
    assert_png(written)
    single = tool.main(tool.get_args_parser().parse_args([str(b)]))
    assert single == b.parent / "curves.png"
    with pytest.raises(UserError, match="--labels gives 1 names for 2 logs"):
        tool.main(tool.get_args_parser().parse_args([str(a), str(b), "--labels", "x"]))


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("curves_data")
    generate_demo_dataset(root, num_train=12, num_val=4, image_size=64, seed=5, show_progress=False)
    return str(root)


@pytest.mark.slow
def test_train_py_writes_curves_png_and_goes_on_without_matplotlib(tiny_data, tmp_path):
    runs = run_forked("train.py", [train_command(tiny_data, tmp_path / name, "--epochs", "1")[2:]
                                   for name in ("with", "without")],
                      preludes=["", "import sys\nsys.modules['matplotlib'] = None  # as if not installed\n"])
    for run in runs:
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert_png(tmp_path / "with" / "curves.png")
    assert "training curves: " in runs[0].stdout
    assert not (tmp_path / "without" / "curves.png").exists() and (tmp_path / "without" / "model_final.pth").exists()
    assert "no curves.png: matplotlib is not installed" in runs[1].stdout

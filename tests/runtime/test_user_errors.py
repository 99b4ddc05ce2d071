"""Every malformed-annotation case of test_coco_dataset.py, through train.py and evaluation.py: one line, exit 1.

Each case is its own run of the script (a process forked from one interpreter that imported
it, tests/forked_scripts.py: a fresh ``python train.py`` costs ~3 s of imports per case); two
cases also run as plain fresh subprocesses, to show the forked runs behave the same.
"""
import json
import re
import shutil
import subprocess
import sys

import pytest

from forked_scripts import REPO, Run, run_forked
from model import build_retinanet
from test_coco_dataset import MALFORMED, base_dataset, write_dataset
from utils.runtime.checkpoint import save_checkpoint


def _delete_images(root):
    for path in (root / "train").iterdir():
        path.unlink()


# Missing and unparsable files (test_missing_and_unparsable_files): (name, change to the dataset
# folder, split to read, whether the data path is a folder that does not exist, expected message).
MISSING = [
    ("unknown split", None, "test", False, r"instances_test\.json not found; splits found in .*: train"),
    ("no image folder", lambda root: shutil.rmtree(root / "train"), "train", False, r"image folder .*train not found"),
    ("no image of the split exists", _delete_images, "train", False, r"none of the images checked exist"),
    ("not json", lambda root: (root / "annotations" / "instances_train.json").write_text("{not json"), "train",
     False, r"instances_train\.json: not a valid JSON file"),
    ("top level is a list", lambda root: (root / "annotations" / "instances_train.json").write_text("[1, 2]"),
     "train", False, r"not a COCO detection file: the top level is a list"),
    ("no data folder", None, "train", True, r"folder .*absent.* does not exist either"),
]
TINY = ["--backbone", "resnet18", "--fpn-channels", "32", "--head-convs", "1", "--min-size", "64", "--max-size", "64"]


def error_line(run) -> str:
    """The run's one ``error:`` line, after checking it failed that way and printed no traceback."""
    output = run.stdout + run.stderr
    assert run.returncode == 1 and "Traceback" not in output, output[-3000:]
    lines = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, output[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """(name, data path, split, annotation file, expected message) for every case, each in its own folder."""
    base = tmp_path_factory.mktemp("user_errors")
    found = []
    for index, (name, mutate, message) in enumerate(MALFORMED):
        data = base_dataset()
        _, ann_file = write_dataset(base / f"malformed{index}", data)
        mutate(data)
        ann_file.write_text(json.dumps(data))
        found.append((name, base / f"malformed{index}", "train", ann_file, message))
    for index, (name, change, split, absent, message) in enumerate(MISSING):
        root = base / f"missing{index}"
        write_dataset(root, base_dataset())
        if change is not None:
            change(root)
        data_path = root / "absent" if absent else root
        found.append((name, data_path, split, data_path / "annotations" / f"instances_{split}.json", message))
    return found


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model = build_retinanet(num_classes=3, backbone="resnet18", fpn_channels=32, head_convs=1, min_size=64,
                            max_size=64)
    path = tmp_path_factory.mktemp("user_errors_ckpt") / "model.pth"
    categories = sorted(base_dataset()["categories"], key=lambda c: c["id"])
    save_checkpoint({"model": model.state_dict(), "model_config": model.config, "categories": categories}, str(path))
    return path


def check_all(cases, runs):
    assert len(runs) == len(cases)
    for (name, _, _, ann_file, message), run in zip(cases, runs):
        line = error_line(run)
        assert re.search(message, line), f"{name}: {line}"
        assert str(ann_file) in line or str(ann_file.parent.parent) in line, f"{name}: {line}"


def train_argv(data_path, split, out):
    return ["--recipe", "demo", "--data-path", data_path, "--train-split", split, "--val-split", split,
            "--output-dir", out, "--workers", "0", "--device", "cpu", *TINY]


BROKEN_PARSER = ("import coco_dataset\ndef broken(*args, **kwargs):\n    return 1 / 0\n"
                 "coco_dataset.parse_coco_detection = broken\n")


@pytest.fixture(scope="module")
def train_runs(cases, tmp_path_factory):
    """train.py on every case, then once with a fault injected into our own code."""
    out = tmp_path_factory.mktemp("user_errors_train")
    argvs = [train_argv(data, split, out / f"run{i}") for i, (_, data, split, _, _) in enumerate(cases)]
    argvs.append(train_argv(cases[0][1], "train", out / "bug"))
    return run_forked("train.py", argvs, preludes=[""] * len(cases) + [BROKEN_PARSER])


# Results files that are not COCO results, scored against a good ground truth: (content, message).
GOOD_RESULT = {"image_id": 5, "category_id": 90, "bbox": [1, 2, 3, 4], "score": 0.5}
BAD_RESULTS = [
    (None, r"results file .*bad0\.json not found"),
    ("{not json", r"bad1\.json: not a valid JSON file"),
    (json.dumps({"annotations": []}), r"holds a JSON dict; expected a COCO results list"),
    (json.dumps([GOOD_RESULT, {k: v for k, v in GOOD_RESULT.items() if k != "score"}]), r"result #1 lacks score"),
    (json.dumps([{**GOOD_RESULT, "image_id": 77}]), r"result #0 has image_id 77, which is not in .*instances_train"),
    (json.dumps([{**GOOD_RESULT, "category_id": 4}]), r"result #0 has category_id 4, which is not among .*\[3, 7, 90\]"),
    (json.dumps([{**GOOD_RESULT, "bbox": [1, 2, 3]}]), r"result #0 has bbox \[1, 2, 3\]; expected \[x, y, width"),
    (json.dumps([{**GOOD_RESULT, "image_id": "5"}]), r"result #0 has image_id='5'; COCO ids are integers"),
]
# Cases whose annotation file exists and can be handed to --results as the ground truth.
NO_FILE = ("unknown split", "no image folder", "no data folder", "no image of the split exists")


@pytest.fixture(scope="module")
def evaluation_runs(cases, checkpoint, tmp_path_factory):
    """evaluation.py: --checkpoint on every case; --results against every case's annotation file; bad
    results files. One forked driver for all: ``{"checkpoint": runs, "ground_truth": runs, "results": runs}``."""
    out = tmp_path_factory.mktemp("user_errors_eval")
    empty = out / "empty.json"
    empty.write_text("[]")
    _, good_ann_file = write_dataset(out / "good", base_dataset())
    groups = {
        "checkpoint": [["--checkpoint", checkpoint, "--data-path", data, "--split", split, "--workers", "0",
                        "--device", "cpu", "--output-dir", out / f"run{i}"]
                       for i, (_, data, split, _, _) in enumerate(cases)],
        "ground_truth": [["--results", empty, "--ann-file", ann_file, "--output-dir", out / "scored"]
                         for name, _, _, ann_file, _ in cases if name not in NO_FILE],
        "results": [],
    }
    for index, (content, _) in enumerate(BAD_RESULTS):
        path = out / f"bad{index}.json"
        if content is not None:
            path.write_text(content)
        groups["results"].append(["--results", path, "--ann-file", good_ann_file, "--output-dir", out / "scored"])
    runs = run_forked("evaluation.py", [argv for argvs in groups.values() for argv in argvs])
    by_group, start = {}, 0
    for name, argvs in groups.items():
        by_group[name], start = runs[start:start + len(argvs)], start + len(argvs)
    return by_group


def test_train_py_prints_every_dataset_error_as_one_line(cases, train_runs):
    check_all(cases, train_runs[:len(cases)])


def test_evaluation_py_prints_every_dataset_error_as_one_line(cases, evaluation_runs):
    check_all(cases, evaluation_runs["checkpoint"])
    # --results scores a file against --ann-file: the ground truth goes through the same validation.
    check_all([case for case in cases if case[0] not in NO_FILE], evaluation_runs["ground_truth"])


def test_evaluation_py_names_what_is_wrong_with_a_results_file(evaluation_runs):
    assert len(evaluation_runs["results"]) == len(BAD_RESULTS)
    for (_, message), run in zip(BAD_RESULTS, evaluation_runs["results"]):
        assert re.search(message, error_line(run)), error_line(run)


def test_a_bug_keeps_its_traceback(train_runs):
    """A failure that is not the user's (a fault injected into the annotation parser) shows where it happened."""
    run = train_runs[-1]
    assert run.returncode == 1 and "Traceback (most recent call last)" in run.stderr
    assert "ZeroDivisionError" in run.stderr and "coco_dataset.py" in run.stderr


@pytest.mark.slow
def test_fresh_subprocesses_match_the_forked_runs(cases, checkpoint, tmp_path):
    """The issue's example (unknown category_id) with a plain ``python train.py`` / ``python evaluation.py``."""
    (name, data, split, ann_file, message), = [case for case in cases if case[0] == "unknown category"]
    commands = [[sys.executable, "train.py", *map(str, train_argv(data, split, tmp_path / "train"))],
                [sys.executable, "evaluation.py", "--checkpoint", str(checkpoint), "--data-path", str(data),
                 "--split", split, "--workers", "0", "--device", "cpu"]]
    procs = [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for cmd in commands]
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=300)
        line = error_line(Run(proc.returncode, stdout, stderr))
        assert re.search(message, line) and str(ann_file) in line
        assert "category_id 999, which is not in 'categories' (ids: [3, 7, 90])" in line

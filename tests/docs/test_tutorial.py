"""docs/tutorial.ipynb: stored with the outputs of a full run, and runs top to bottom at toy size (nbclient)."""
import importlib.util
import json
import math
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
NOTEBOOK = REPO / "docs" / "tutorial.ipynb"

# Appended to the notebook by the toy run: the values the test checks, as one JSON line.
REPORT_CELL = """print("TUTORIAL_REPORT " + json.dumps({
    "easy_negative": easy_negative, "history": history, "toy": TOY, "work": str(WORK),
    "figure4": json.loads((WORK / "figure4.json").read_text())["gammas"]}))"""


def load_run_tutorial():
    """tools/run_tutorial.py as a module (tools/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("run_tutorial", REPO / "tools" / "run_tutorial.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def stdout_of(cell) -> str:
    """The cell's printed text; a stored notebook keeps it as a list of lines, nbclient as one string."""
    return "".join("".join(output["text"]) for output in cell["outputs"]
                   if output["output_type"] == "stream" and output["name"] == "stdout")


def test_stored_notebook_holds_the_outputs_of_a_full_run():
    notebook = json.loads(NOTEBOOK.read_text())
    code_cells = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
    assert len(code_cells) >= 10
    # Run in one go, top to bottom, by a fresh kernel (tools/run_tutorial.py), not cell by cell by hand.
    assert [cell["execution_count"] for cell in code_cells] == list(range(1, len(code_cells) + 1))
    outputs = [output for cell in code_cells for output in cell["outputs"]]
    errors = [output for output in outputs if output["output_type"] == "error"]
    assert not errors, errors[0]["ename"] + ": " + errors[0]["evalue"]
    pictures = [output for output in outputs if "image/png" in output.get("data", {})]
    assert len(pictures) >= 5  # Figure 1, anchors, loss curve, detections, Figure 4
    assert "toy sizes: False" in stdout_of(code_cells[0])  # not the toy run's outputs
    assert NOTEBOOK.stat().st_size < 2_000_000


@pytest.mark.slow
def test_tutorial_runs_top_to_bottom_at_toy_size(tmp_path):
    pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    nbformat = pytest.importorskip("nbformat")
    run_tutorial = load_run_tutorial()
    docs_before = sorted(path.name for path in NOTEBOOK.parent.iterdir())
    notebook = run_tutorial.read_notebook(NOTEBOOK)
    notebook.cells.append(nbformat.v4.new_code_cell(REPORT_CELL))
    run_tutorial.execute(notebook, toy=True, workdir=tmp_path, timeout=600)

    report = json.loads(stdout_of(notebook.cells[-1]).split("TUTORIAL_REPORT ", 1)[1])
    assert report["toy"] is True and report["work"] == str(tmp_path)
    # Section 1 (losses.sigmoid_focal_loss): an easy negative, p_t = 0.99, loses 10^4 / 0.75 times less under FL.
    # (float32: the loss computes in it whatever the input dtype)
    assert report["easy_negative"]["ce"] == pytest.approx(-math.log(0.99), rel=1e-4)
    assert report["easy_negative"]["focal"] == pytest.approx(0.75 * 1e-4 * -math.log(0.99), rel=1e-4)
    # Section 4 trained, with finite losses; section 5 ran tools/loss_distribution.py on the checkpoint.
    assert report["history"] and all(math.isfinite(value) for step in report["history"] for value in step.values())
    assert set(report["figure4"]) == {"0", "0.5", "1", "2"}
    assert report["figure4"]["2"]["negative"]["count"] > 0
    assert (tmp_path / "figure4.png").is_file() and (tmp_path / "run" / "model_final.pth").is_file()
    pictures = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs
                if "image/png" in output.get("data", {})]
    assert len(pictures) >= 5
    assert sorted(path.name for path in NOTEBOOK.parent.iterdir()) == docs_before  # wrote only into tmp_path


def test_toy_outputs_are_never_stored_in_the_tutorial(tmp_path):
    pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    run_tutorial = load_run_tutorial()
    with pytest.raises(run_tutorial.ConfigError, match="--toy would store toy outputs"):
        run_tutorial.main(run_tutorial.get_args_parser().parse_args(["--toy"]))

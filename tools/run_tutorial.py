"""Run docs/tutorial.ipynb top to bottom in a fresh kernel and store it with its outputs.

    python tools/run_tutorial.py                        # the full run (minutes on a CPU), outputs written back
    python tools/run_tutorial.py --toy --output /tmp/toy.ipynb    # every cell at tiny sizes, in seconds

The notebook is the tutorial's only source: edit it in Jupyter, then run this so that GitHub
shows the pictures of the current code. The kernel starts in ``docs/`` (the notebook finds the
library from there) and writes its files to a temporary folder. ``nbclient`` and ``ipykernel``
are test-only dependencies (``requirements-test.txt``); ``tests/docs/test_tutorial.py`` runs the
notebook through :func:`execute` at toy size.
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from utils.runtime.errors import ConfigError, UserError, exit_on_user_error  # noqa: E402

NOTEBOOK = REPO / "docs" / "tutorial.ipynb"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Run docs/tutorial.ipynb and store its outputs",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--notebook", default=str(NOTEBOOK), help="the notebook to run")
    parser.add_argument("--output", help="where to write the executed notebook; default: over --notebook")
    parser.add_argument("--toy", action="store_true", help="tiny sizes (TUTORIAL_TOY=1): checks every cell runs")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds one cell may run")
    return parser


def read_notebook(path):
    """The notebook at ``path`` with its outputs and execution counts cleared."""
    import nbformat
    try:
        notebook = nbformat.read(str(path), as_version=4)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read notebook {path}: {exc}") from None
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    return notebook


def execute(notebook, *, toy: bool = False, workdir=None, timeout: int = 1800, working_dir=REPO / "docs"):
    """Run every cell of ``notebook`` (outputs stored in it) in a fresh Python 3 kernel started in
    ``working_dir``, with ``TUTORIAL_TOY`` and ``TUTORIAL_WORKDIR`` (where the notebook writes; a new
    temporary folder if None) in its environment. Returns the notebook; raises
    ``nbclient.exceptions.CellExecutionError`` at the first cell that fails."""
    from nbclient import NotebookClient
    environment = {"TUTORIAL_TOY": "1" if toy else "0"}
    if workdir is not None:
        environment["TUTORIAL_WORKDIR"] = str(workdir)
    client = NotebookClient(notebook, timeout=timeout, kernel_name="python3", record_timing=False,
                            resources={"metadata": {"path": str(working_dir)}})
    saved = {key: os.environ.get(key) for key in ("TUTORIAL_TOY", "TUTORIAL_WORKDIR")}
    os.environ.update(environment)  # the kernel inherits this process's environment
    try:
        client.execute()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return notebook


def main(args) -> Path:
    try:
        import ipykernel  # noqa: F401
        import nbclient  # noqa: F401
        import nbformat
    except ImportError as exc:
        raise ConfigError(f"{exc.name} is missing: pip install -r requirements-test.txt") from None
    output = Path(args.output or args.notebook)
    if args.toy and output.resolve() == NOTEBOOK.resolve():
        raise ConfigError("--toy would store toy outputs in docs/tutorial.ipynb; give --output another path")
    notebook = read_notebook(args.notebook)
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="retinanet_tutorial_") as workdir:
        execute(notebook, toy=args.toy, workdir=workdir, timeout=args.timeout)
    print(f"ran {len(notebook.cells)} cells in {time.time() - start:.0f} s")
    output.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(notebook, str(output))
    print(f"wrote {output} ({output.stat().st_size / 1e6:.2f} MB)")
    return output


if __name__ == "__main__":
    exit_on_user_error(main, get_args_parser().parse_args())

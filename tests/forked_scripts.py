"""Run an entry script many times, each run a process of its own forked from one interpreter that imported it.

``python train.py ARGS`` spends about 3 s before ``main`` starts (the interpreter and torch's
import); dozens of runs that each stop at a validation error would take minutes. Here a
driver process imports the script once (as a module, so nothing but its imports runs) and
forks once per run; the child executes the script as ``__main__`` with its own ``sys.argv``,
stdout and stderr, and ends the way the interpreter ends a program: ``SystemExit("text")``
prints the text on stderr with status 1, an uncaught exception prints its traceback with
status 1. Nothing is shared between runs but the imported modules.

    results = run_forked("train.py", [["--data-path", "a"], ["--data-path", "b"]])
    results[0].returncode, results[0].stdout, results[0].stderr

Used by the tests as a library; ``python tests/forked_scripts.py JOBS.json RESULTS.json`` is the driver.
"""
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str


def run_forked(script: str, argvs: list, env: dict = None, preludes: list = None, timeout: float = 600) -> list:
    """Run ``python script *argv`` for each argv in ``argvs`` (from the repository root); a :class:`Run` each.

    ``preludes``: per run, Python code its child executes before the script (a test injecting a fault).
    """
    with tempfile.TemporaryDirectory() as folder:
        jobs, results = os.path.join(folder, "jobs.json"), os.path.join(folder, "results.json")
        with open(jobs, "w") as f:
            json.dump({"script": script, "argvs": [[str(a) for a in argv] for argv in argvs], "folder": folder,
                       "preludes": preludes or [""] * len(argvs)}, f)
        driver = subprocess.run([sys.executable, os.path.abspath(__file__), jobs, results], cwd=REPO,
                                env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
                                capture_output=True, text=True, timeout=timeout)
        assert driver.returncode == 0, driver.stdout[-3000:] + driver.stderr[-3000:]
        with open(results) as f:
            return [Run(**run) for run in json.load(f)]


def _child(script: str, argv: list, stdout_path: str, stderr_path: str, prelude: str) -> None:
    """In the forked process: run the script as ``__main__``; never returns."""
    import runpy
    import traceback
    for fd, path in ((1, stdout_path), (2, stderr_path)):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    sys.argv = [script, *argv]
    status = 0
    try:
        exec(prelude, {})
        runpy.run_path(os.path.join(REPO, script), run_name="__main__")
    except SystemExit as exc:  # what the interpreter does with it at the end of a program
        if exc.code is None or isinstance(exc.code, int):
            status = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
            status = 1
    except BaseException:  # noqa: BLE001 - an uncaught exception: its traceback, status 1
        traceback.print_exc()
        status = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _drive(jobs_path: str, results_path: str) -> None:
    import importlib.util
    with open(jobs_path) as f:
        jobs = json.load(f)
    sys.path.insert(0, REPO)
    # The script's imports, once: as a module its __main__ block does not run.
    spec = importlib.util.spec_from_file_location("_script_imports", os.path.join(REPO, jobs["script"]))
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    runs = []
    for index, argv in enumerate(jobs["argvs"]):
        out, err = (os.path.join(jobs["folder"], f"{index}.{name}") for name in ("out", "err"))
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(jobs["script"], argv, out, err, jobs["preludes"][index])
        _, status = os.waitpid(pid, 0)
        with open(out) as f_out, open(err) as f_err:
            runs.append({"returncode": os.waitstatus_to_exitcode(status), "stdout": f_out.read(),
                         "stderr": f_err.read()})
    with open(results_path, "w") as f:
        json.dump(runs, f)


if __name__ == "__main__":
    _drive(sys.argv[1], sys.argv[2])

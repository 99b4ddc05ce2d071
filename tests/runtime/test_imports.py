"""Every module imports on its own in a fresh interpreter, and the files import each other one way (no cycle)."""
import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SKIP_DIRS = {"tests", ".git", "data", "output", "outputs", "venv", ".venv", "__pycache__", "inference_output"}


def repo_python_files() -> list:
    """Every ``.py`` file of the repository except the tests (scripts, packages, tools, benchmarks)."""
    files = []
    for root, dirs, names in os.walk(REPO):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("."))
        files += [Path(root) / name for name in sorted(names) if name.endswith(".py")]
    return files


def module_name(path: Path) -> str:
    """Dotted name of a file inside a package chain from the repo root, else None (a script in a plain folder)."""
    relative = path.relative_to(REPO).with_suffix("")
    parts = list(relative.parts)
    for depth in range(1, len(parts)):
        if not (REPO.joinpath(*parts[:depth]) / "__init__.py").is_file():
            return None
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


# One fresh interpreter imports the third-party packages once, then forks a child per module, which
# imports that module with none of the repository's modules loaded: the same check as a new
# interpreter per module (our modules cannot depend on what torch has loaded), in seconds instead
# of a torch import per file. A script in a plain folder (tools/, benchmarks/) imports as its own
# top-level module, the way ``python benchmarks/benchmark.py`` runs it.
_RUNNER = """
import importlib, importlib.util, json, os, sys, traceback
for name in ("torch", "torchvision", "numpy", "PIL.Image", "pycocotools.coco", "pycocotools.cocoeval", "tqdm",
             "matplotlib", "onnx", "onnxruntime", "av"):
    try:
        importlib.import_module(name)
    except ImportError:
        pass
assert not any(m.split(".")[0] in ("model", "losses", "ops", "utils", "train") for m in sys.modules)
results = {}
for name, path in json.loads(sys.argv[1]):
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        code = 0
        try:
            if name:
                importlib.import_module(name)
            else:
                spec = importlib.util.spec_from_file_location("script_under_test", path)
                spec.loader.exec_module(importlib.util.module_from_spec(spec))
        except BaseException:
            os.write(write_end, traceback.format_exc().encode()[-4000:])
            code = 1
        os._exit(code)
    os.close(write_end)
    message = b""
    while chunk := os.read(read_end, 65536):
        message += chunk
    os.close(read_end)
    _, status = os.waitpid(pid, 0)
    results[path] = [os.waitstatus_to_exitcode(status), message.decode(errors="replace")]
print(json.dumps(results))
"""


def test_every_module_imports_on_its_own_in_a_fresh_interpreter():
    files = repo_python_files()
    assert len(files) > 40 and REPO / "train.py" in files and REPO / "model" / "weights.py" in files
    modules = [[module_name(path) or "", str(path)] for path in files]
    result = subprocess.run([sys.executable, "-c", _RUNNER, json.dumps(modules)], cwd=REPO, capture_output=True,
                            text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    outcomes = json.loads(result.stdout.strip().splitlines()[-1])
    assert sorted(outcomes) == sorted(str(path) for path in files)
    failures = [f"{Path(path).relative_to(REPO)}: {message.strip().splitlines()[-1] if message else code}"
                for path, (code, message) in outcomes.items() if code != 0]
    assert not failures, "\n".join(failures)


def imported_modules(path: Path) -> list:
    """Every module name ``path`` imports, at any depth (function-level imports count: they are how
    cycles hide), with relative imports resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    own = module_name(path)
    package = (own if path.name == "__init__.py" else own.rpartition(".")[0]) if own else ""
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[:len(package.split(".")) - node.level + 1] if package else []
                base = ".".join(parent + ([base] if base else []))
            names.append(base)
            names += [f"{base}.{alias.name}" for alias in node.names]  # `from pkg import submodule`
    return names


def repo_file_of(name: str, files: dict):
    """The repository file a dotted module name refers to, or None (third-party / an attribute)."""
    return files.get(name)


def import_graph() -> dict:
    """file -> set of files it makes Python execute when imported.

    Importing ``pkg.mod`` from outside ``pkg`` also runs ``pkg/__init__.py``: that edge is what
    turned ``losses -> model.matcher`` into a cycle through ``model/__init__.py`` before.
    """
    by_name = {}
    for path in repo_python_files():
        name = module_name(path)
        by_name[name or path.stem] = path
    graph = {}
    for path in repo_python_files():
        own = module_name(path) or ""
        edges = set()
        for name in imported_modules(path):
            target = repo_file_of(name, by_name)
            if target is None or target == path:
                continue
            edges.add(target)
            parts = name.split(".")
            for depth in range(1, len(parts)):  # enclosing packages not enclosing the importer
                package = ".".join(parts[:depth])
                if not (own == package or own.startswith(package + ".")) and package in by_name:
                    edges.add(by_name[package])
        edges.discard(path)
        graph[path] = edges
    return graph


def find_cycle(graph: dict):
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_import_graph_is_acyclic():
    graph = import_graph()
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(str(p.relative_to(REPO)) for p in cycle)


def test_layers_import_one_way():
    """utils <- ops <- losses <- model <- deploy: no lower layer imports a higher one."""
    layers = ["utils", "ops", "losses", "model", "deploy"]
    graph = import_graph()
    for path, targets in graph.items():
        layer = path.relative_to(REPO).parts[0]
        if layer not in layers:
            continue
        for target in targets:
            target_layer = target.relative_to(REPO).parts[0]
            assert target_layer not in layers or layers.index(target_layer) <= layers.index(layer), \
                f"{path.relative_to(REPO)} ({layer}) imports {target.relative_to(REPO)} ({target_layer})"


@pytest.mark.parametrize("source,expected_cycle", [
    ({"a/__init__.py": "from a.x import f\n", "a/x.py": "from b.y import g\n", "b/__init__.py": "",
      "b/y.py": "def g():\n    from a.z import h\n", "a/z.py": ""}, True),
    ({"a/__init__.py": "from a.x import f\n", "a/x.py": "from a.z import h\n", "a/z.py": ""}, False),
])
def test_the_graph_sees_cycles_through_package_inits_and_function_level_imports(source, expected_cycle, tmp_path,
                                                                                  monkeypatch):
    for name, text in source.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    assert (find_cycle(import_graph()) is not None) == expected_cycle


ENTRY_SCRIPTS = ("train", "evaluation", "inference", "export")


def _is_program(path: Path) -> bool:
    """A file with a top-level ``if __name__ == "__main__":`` block: something one runs, not imports."""
    for node in ast.parse(path.read_text(), filename=str(path)).body:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Compare) \
                and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__" \
                and any(isinstance(c, ast.Constant) and c.value == "__main__" for c in node.test.comparators):
            return True
    return False


def script_imports() -> list:
    """``"FILE imports WHAT"`` for each import of an entry script or a tool anywhere outside tests/.

    A tool is a program of ``tools/``; the modules beside it that are no program (ablate.py's
    ``ablation_grids``, ``ablation_report``) are its own parts, which only ``tools/`` may import.
    Function-level imports count, and ``tools.X`` counts as ``X``.
    """
    tools = {path.stem: path for path in sorted((REPO / "tools").glob("*.py"))}
    found = set()
    for path in repo_python_files():
        relative = path.relative_to(REPO)
        in_tools = relative.parts[0] == "tools"
        for name in imported_modules(path):
            parts = name.split(".")
            if parts[0] in ENTRY_SCRIPTS and (REPO / f"{parts[0]}.py").is_file() and path != REPO / f"{parts[0]}.py":
                found.add(f"{relative.as_posix()} imports the entry script {parts[0]}.py")
            tool = parts[1] if parts[0] == "tools" and len(parts) > 1 else parts[0]
            if tool in tools and tools[tool] != path and (not in_tools or _is_program(tools[tool])):
                found.add(f"{relative.as_posix()} imports the tool tools/{tool}.py")
    return sorted(found)


def test_no_file_imports_an_entry_script_or_a_tool():
    """What two scripts share lives in the library: the training loop and evaluation in engine.py,
    the training options in train_options.py and recipes.py; a script that imports another runs its imports
    and couples their command lines."""
    found = script_imports()
    assert not found, "\n".join(found)


@pytest.mark.parametrize("source,expected", [
    ({"train.py": "", "tools/a.py": "import train\nif __name__ == '__main__':\n    pass\n"},
     ["tools/a.py imports the entry script train.py"]),
    ({"inference.py": "", "export.py": "def main():\n    from inference import list_images\n"},
     ["export.py imports the entry script inference.py"]),
    ({"evaluation.py": "", "utils/__init__.py": "", "utils/x.py": "from evaluation import evaluate\n"},
     ["utils/x.py imports the entry script evaluation.py"]),
    ({"tools/a.py": "if __name__ == '__main__':\n    pass\n", "benchmarks/b.py": "import a\n"},
     ["benchmarks/b.py imports the tool tools/a.py"]),
    ({"tools/a.py": "from c import g\n", "tools/c.py": "if __name__ == '__main__':\n    pass\n"},
     ["tools/a.py imports the tool tools/c.py"]),
    ({"tools/helper.py": "", "train.py": "from tools.helper import f\n"},
     ["train.py imports the tool tools/helper.py"]),
    # Allowed: a tool's own helper module beside it, the library, a test.
    ({"tools/a.py": "from helper import f\nif __name__ == '__main__':\n    pass\n", "tools/helper.py": "",
      "engine.py": "", "train.py": "from engine import f\n", "tests/test_x.py": "import train\n"}, []),
])
def test_the_script_check_sees_entry_scripts_and_tools_imported(source, expected, tmp_path, monkeypatch):
    for name, text in source.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    assert script_imports() == expected

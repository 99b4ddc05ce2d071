"""The docs cannot rot: every command in README.md and docs/*.md names a script that exists and
flags that script's ``--help`` lists, and every relative link and image path resolves.

Commands are read from fenced shell blocks (```bash, ```sh, ```shell, ```console) and from code
spans in the prose that start with ``python`` or ``torchrun``. A command
runs a repository script when it is ``python X.py ...``, ``python -m pkg.mod ...`` (a module of
this repository; ``python -m pytest`` and other installed modules are not ours to check) or
``torchrun [its own options] X.py ...``. Each distinct script's ``--help`` is read once: one
interpreter imports torch and the other heavy packages, then forks a child per script, so the
whole check costs one torch import instead of one per script.
"""
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHELL_LANGUAGES = {"bash", "sh", "shell", "console"}
PYTHON = re.compile(r"^(?:.*/)?python(?:3(?:\.\d+)?)?$")
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HTML_SOURCE = re.compile(r"<(?:img|a)\b[^>]*?\b(?:src|href)=\"([^\"]+)\"", re.IGNORECASE)
FLAG = re.compile(r"(?<![\w-])(--[A-Za-z0-9][A-Za-z0-9_-]*)")

# Scripts that pass every option they do not know on to another script (ablate.py runs train.py
# per cell): a flag is valid when either --help lists it. Their --help must say so.
FORWARDS = {("path", "tools/ablate.py"): (("path", "train.py"), "passed to train.py")}


def doc_files() -> list:
    return [REPO / "README.md"] + sorted((REPO / "docs").glob("*.md"))


def fenced_blocks(text: str):
    """``(language, first line number, lines)`` of each fenced block."""
    blocks, language, start, body = [], None, 0, None
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if body is None and stripped.startswith("```"):
            language, start, body = stripped[3:].strip().lower(), number + 1, []
        elif body is not None and stripped.startswith("```"):
            blocks.append((language, start, body))
            body = None
        elif body is not None:
            body.append(line)
    return blocks


def shell_commands(language: str, start: int, lines: list):
    """``(line number, tokens)`` of each simple command of a shell block.

    Line continuations are joined, comments dropped, and ``|``, ``&&``, ``||`` and ``;`` split a
    line into its commands. In a ``console`` block only ``$ `` lines are commands; the rest is output.
    """
    logical, pending, pending_line = [], "", None
    for offset, line in enumerate(lines):
        if language == "console" and not pending:
            if not line.lstrip().startswith("$ "):
                continue
            line = line.lstrip()[2:]
        if pending_line is None:
            pending_line = start + offset
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        logical.append((pending_line, pending + line))
        pending, pending_line = "", None
    if pending:
        logical.append((pending_line, pending))
    for number, line in logical:
        lexer = shlex.shlex(line, posix=True, punctuation_chars="|&;")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        command = []
        for token in lexer:
            if token and set(token) <= set("|&;"):
                if command:
                    yield number, command
                command = []
            else:
                command.append(token)
        if command:
            yield number, command


def repository_script(tokens: list):
    """``(kind, name, arguments)`` when the command runs this repository's code, else None.

    kind is "path" (``X.py`` relative to the repository root) or "module" (``pkg.mod``).
    """
    while tokens and ENV_ASSIGNMENT.match(tokens[0]):
        tokens = tokens[1:]
    if not tokens:
        return None
    program, rest = tokens[0], tokens[1:]
    if PYTHON.match(program):
        while rest and rest[0].startswith("-") and rest[0] != "-m":
            rest = rest[1:]  # interpreter options such as -u or -X dev
        if rest and rest[0] == "-m":
            if len(rest) < 2:
                return None
            module = rest[1]
            top = module.split(".")[0]
            if not ((REPO / top).is_dir() or (REPO / f"{top}.py").is_file()):
                return None  # an installed module (pytest, pip, torch.distributed.run): not ours
            return "module", module, rest[2:]
        if rest and rest[0].endswith(".py"):
            return "path", rest[0], rest[1:]
        return None
    if Path(program).name == "torchrun":
        for index, token in enumerate(rest):
            if token == "-m" and index + 1 < len(rest):
                return "module", rest[index + 1], rest[index + 2:]
            if token.endswith(".py"):
                return "path", token, rest[index + 1:]
    return None


def inline_commands(text: str):
    """``(line number, command)`` of each code span in the prose that starts with python or torchrun."""
    fence = False
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip().startswith("```"):
            fence = not fence
        elif not fence:
            for span in re.findall(r"`([^`]+)`", line):
                if re.match(r"^(python3?|torchrun) ", span):
                    yield number, span


def documented_commands() -> list:
    """``(where, kind, name, arguments)`` of each command that runs this repository's code: those of
    the shell blocks, and those written inline in the prose (`python tools/plot_focal_loss.py`)."""
    found = []
    for doc in doc_files():
        text = doc.read_text()
        commands = []
        for language, start, lines in fenced_blocks(text):
            if language in SHELL_LANGUAGES:
                commands += shell_commands(language, start, lines)
        for number, span in inline_commands(text):
            commands += shell_commands("bash", number, [span])
        for number, tokens in commands:
            script = repository_script(tokens)
            if script is not None:
                found.append((f"{doc.relative_to(REPO).as_posix()}:{number}", *script))
    return found


def module_file(module: str):
    base = REPO.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__main__.py"):
        if candidate.is_file():
            return candidate
    return None


def passed_flags(arguments: list) -> list:
    """The long options a command passes: ``--flag``, ``--flag=value``, ``[--flag`` (an optional one)."""
    flags = []
    for argument in arguments:
        argument = argument.strip("[]")
        if argument == "--":
            break
        if argument.startswith("--") and len(argument) > 2:
            flags.append(argument.split("=", 1)[0])
    return flags


# One interpreter, heavy packages imported once, then a forked child per script runs it as
# ``__main__`` with ``--help`` (argparse prints and exits): the same output as ``python X.py --help``.
_HELP_RUNNER = r"""
import importlib, json, os, runpy, sys
for name in ("torch", "torchvision", "numpy", "PIL.Image", "pycocotools.coco", "tqdm", "matplotlib",
             "onnx", "onnxruntime", "av"):
    try:
        importlib.import_module(name)
    except ImportError:
        pass
repo, out_dir = sys.argv[1], sys.argv[2]
results = {}
for index, (kind, name) in enumerate(json.loads(sys.argv[3])):
    out_path = os.path.join(out_dir, f"{index}.txt")
    pid = os.fork()
    if pid == 0:
        fd = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        code = 0
        try:
            if kind == "path":
                path = os.path.join(repo, name)
                sys.argv = [path, "--help"]
                sys.path.insert(0, os.path.dirname(path))
                runpy.run_path(path, run_name="__main__")
            else:
                sys.argv = [name, "--help"]
                sys.path.insert(0, repo)
                runpy.run_module(name, run_name="__main__", alter_sys=True)
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 1)
        except BaseException:
            import traceback
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    with open(out_path) as f:
        results[f"{kind}:{name}"] = [os.waitstatus_to_exitcode(status), f.read()]
print(json.dumps(results))
"""


def help_texts(scripts: tuple, out_dir: str) -> dict:
    """``{"kind:name": [exit code, --help output]}`` for each script, read in one subprocess."""
    process = subprocess.run(
        [sys.executable, "-c", _HELP_RUNNER, str(REPO), out_dir, json.dumps(scripts)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env={**os.environ, "COLUMNS": "200", "PYTHONPATH": str(REPO)})
    assert process.returncode == 0, process.stderr[-3000:]
    return json.loads(process.stdout.strip().splitlines()[-1])


def test_commands_name_existing_scripts_and_their_flags(tmp_path):
    commands = documented_commands()
    assert len(commands) > 20, "the docs' shell blocks were not read"
    problems, to_check = [], []
    for where, kind, name, arguments in commands:
        exists = (REPO / name).is_file() if kind == "path" else module_file(name) is not None
        if not exists:
            problems.append(f"{where}: {name} does not exist")
        else:
            for script in [(kind, name), FORWARDS.get((kind, name), (None,))[0]]:
                if script is not None and script not in to_check:
                    to_check.append(script)
    helps = help_texts(tuple(to_check), str(tmp_path))
    for where, kind, name, arguments in commands:
        if (kind, name) not in to_check:
            continue
        code, text = helps[f"{kind}:{name}"]
        if code != 0:
            problems.append(f"{where}: {name} --help exited {code}: {text.strip().splitlines()[-1:]}")
            continue
        listed = set(FLAG.findall(text))
        if (kind, name) in FORWARDS:
            (target_kind, target), phrase = FORWARDS[(kind, name)]
            assert phrase in " ".join(text.split()), f"{name} --help no longer says {phrase!r}"
            listed |= set(FLAG.findall(helps[f"{target_kind}:{target}"][1]))
        for flag in passed_flags(arguments):
            if flag not in listed:
                problems.append(f"{where}: {name} has no {flag} in its --help")
    assert not problems, "\n".join(problems)


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set:
    found, counts, fence = set(), {}, False
    for line in path.read_text().splitlines():
        if line.strip().startswith("```"):
            fence = not fence
            continue
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match and not fence:
            anchor = github_anchor(match.group(1))
            counts[anchor] = counts.get(anchor, -1) + 1
            found.add(anchor if counts[anchor] == 0 else f"{anchor}-{counts[anchor]}")
    return found


def relative_links(path: Path):
    """``(line number, target)`` of each link and image outside code blocks and code spans."""
    fence = False
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip().startswith("```"):
            fence = not fence
            continue
        if fence:
            continue
        line = re.sub(r"`[^`]*`", "", line)
        for target in LINK.findall(line) + HTML_SOURCE.findall(line):
            if not re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # http:, https:, mailto:
                yield number, target


def test_relative_links_and_images_resolve():
    problems, checked = [], 0
    for doc in doc_files():
        for number, target in relative_links(doc):
            checked += 1
            where = f"{doc.relative_to(REPO).as_posix()}:{number}"
            file_part, _, anchor = target.partition("#")
            resolved = (doc.parent / file_part).resolve() if file_part else doc
            if not resolved.exists():
                problems.append(f"{where}: {target} does not exist")
                continue
            if anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
                problems.append(f"{where}: {target}: no heading with the anchor #{anchor}")
    assert checked > 10, "the docs' links were not read"
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("block,expected", [
    ("python train.py --epochs 1 \\\n    --output-dir out  # a comment --not-a-flag\n",
     [["python", "train.py", "--epochs", "1", "--output-dir", "out"]]),
    ("CUDA_VISIBLE_DEVICES=0 python tools/ablate.py --grid loss | tee log.txt && echo done\n",
     [["CUDA_VISIBLE_DEVICES=0", "python", "tools/ablate.py", "--grid", "loss"], ["tee", "log.txt"],
      ["echo", "done"]]),
])
def test_shell_blocks_are_split_into_commands(block, expected):
    assert [tokens for _, tokens in shell_commands("bash", 1, block.splitlines())] == expected


def test_console_blocks_read_only_prompt_lines():
    lines = ["$ python export.py --verify", "verified: 3 images", "$ python -m pytest -q"]
    assert [tokens for _, tokens in shell_commands("console", 1, lines)] == \
        [["python", "export.py", "--verify"], ["python", "-m", "pytest", "-q"]]


@pytest.mark.parametrize("tokens,expected", [
    (["CUDA_VISIBLE_DEVICES=0", "python", "train.py", "--amp", "fp16"], ("path", "train.py", ["--amp", "fp16"])),
    (["torchrun", "--nproc_per_node=8", "train.py", "--data-path", "x"], ("path", "train.py", ["--data-path", "x"])),
    (["python", "-m", "utils.data.demo_data", "--root", "x"], ("module", "utils.data.demo_data", ["--root", "x"])),
    (["python", "-m", "pytest", "-m", "not slow"], None),
    (["pip", "install", "-r", "requirements.txt"], None),
])
def test_repository_scripts_are_recognised(tokens, expected):
    assert repository_script(tokens) == expected


@pytest.mark.parametrize("heading,anchor", [
    ("Which recipe: `--recipe coco` or `--recipe demo`", "which-recipe---recipe-coco-or---recipe-demo"),
    ("Deploy: ONNX and ONNX Runtime", "deploy-onnx-and-onnx-runtime"),
    ("The `__init__.py` of **model/**", "the-__init__py-of-model"),
])
def test_github_anchors(heading, anchor):
    assert github_anchor(heading) == anchor


def test_flags_with_values_and_optional_brackets():
    assert passed_flags(["--iters", "1", "[--recipe", "scratch]", "--output=x.json", "-v"]) == \
        ["--iters", "--recipe", "--output"]

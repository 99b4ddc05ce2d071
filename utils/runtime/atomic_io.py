"""Crash-safe file writes: a temporary file in the same folder, flushed to disk, then renamed.

A crash (or a full disk) mid-write leaves the previous file, or none, never half a
file. Checkpoints, JSON outputs and the demo data all go through ``atomic_write``.
"""
import contextlib
import json
import os
import tempfile


def atomic_write(path, write, binary: bool = True) -> None:
    """Call ``write(file_object)`` on a temporary file beside ``path``, fsync it, rename it over ``path``."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    # mkstemp, not path + ".tmp": two processes writing the same file must not share a temp name.
    fd, tmp_path = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp_path, 0o644)  # mkstemp makes it owner-only; outputs are meant to be shared
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp_path)
        raise


def write_json_atomic(path, obj, compact: bool = False) -> None:
    """``json.dump(obj)`` into ``path`` through :func:`atomic_write`."""
    atomic_write(path, lambda f: json.dump(obj, f, separators=(",", ":") if compact else None), binary=False)

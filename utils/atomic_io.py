"""Crash-safe file writes: temp file in the same folder, then an atomic rename."""
import contextlib
import json
import os
import tempfile


def write_json_atomic(path, obj, compact: bool = False) -> None:
    """Write JSON to a temp file in the same folder, then rename: a crash never leaves half a file."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    # mkstemp, not path + ".tmp": two processes writing the same file must not share a temp name.
    fd, tmp_path = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, separators=(",", ":") if compact else None)
        os.chmod(tmp_path, 0o644)  # mkstemp makes it owner-only; outputs are meant to be shared
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp_path)
        raise

"""Errors caused by the user's input, and how entry scripts report them.

A mistake in the data, a flag, a file or the weights raises a :class:`UserError`
(or a subclass) whose message names the file or option and the problem. Entry
scripts run their ``main`` through :func:`exit_on_user_error`: such an error ends the
process with one line and a non-zero status, never a traceback. Any other exception is
a bug of ours and keeps its traceback.
"""
import json
import os
import time


class UserError(Exception):
    """A problem with what the user gave us; the message alone tells them what to fix."""


class ConfigError(UserError, ValueError):
    """Options that do not fit together (a flag, a recipe value, a model configuration key)."""


class DatasetError(UserError, ValueError):
    """An annotation file or dataset that cannot be used; the message names the file and the entry."""


class DatasetNotFoundError(UserError, FileNotFoundError):
    """A missing annotation file or image folder; the message says what does exist."""


class InferenceError(UserError, RuntimeError):
    """Inputs or outputs an inference run cannot work with (nothing readable, an output would be
    overwritten)."""


# Long enough for rank 0 to reach the same error (ranks fail at the same step, give or take a
# slow file system or DNS look-up), short enough not to matter when only this rank failed.
OTHER_RANKS_EXIT_DELAY_S = 5.0


def exit_on_user_error(main, *args, rank: int = None):
    """``main(*args)``; a :class:`UserError` ends the process with ``error: <message>`` (one line,
    on stderr) and exit status 1, like ``sys.exit("error: ...")``.

    Under DDP every rank takes the same decisions, so every rank raises the same error:
    only rank 0 (``RANK`` in the environment, or ``rank``) prints it, the others exit quietly.
    Under torchrun the line also goes into the worker's error file, so that the failure
    summary torchrun prints names the cause ("traceback : error: ...") instead of a link
    to its documentation; and the other ranks wait a moment before exiting, since the first
    worker to exit makes torchrun stop the rest, rank 0 with its line unprinted included.
    """
    try:
        return main(*args)
    except UserError as exc:
        line = f"error: {' '.join(str(exc).split())}"
        _write_torchelastic_error_file(line)
        if (int(os.environ.get("RANK", "0")) if rank is None else rank) == 0:
            raise SystemExit(line) from None
        if os.environ.get("TORCHELASTIC_ERROR_FILE"):
            time.sleep(OTHER_RANKS_EXIT_DELAY_S)  # normally ended sooner: rank 0 exits, torchrun stops us
        raise SystemExit(1) from None


def _write_torchelastic_error_file(line: str) -> None:
    """Record ``line`` where torchrun's agent reads a failed worker's cause (``TORCHELASTIC_ERROR_FILE``).

    The format is the one ``torch.distributed.elastic``'s ``ErrorHandler`` writes; its summary
    shows ``extraInfo.py_callstack``, here the one line instead of a Python traceback.
    """
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    record = {"message": {"message": line, "extraInfo": {"py_callstack": line, "timestamp": str(int(time.time()))}}}
    try:
        with open(path, "w") as f:
            json.dump(record, f)
    except OSError:
        pass  # the summary then says less; the line itself is still printed

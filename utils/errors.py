"""Errors caused by the user's input, and how entry scripts report them.

A mistake in the data, a flag, a file or the weights raises a :class:`UserError`
(or a subclass) whose message names the file or option and the problem. Entry
scripts run their ``main`` through :func:`exit_on_user_error`: such an error ends the
process with one line and a non-zero status, never a traceback. Any other exception is
a bug of ours and keeps its traceback.
"""
import os
import sys


class UserError(Exception):
    """A problem with what the user gave us; the message alone tells them what to fix."""


class ConfigError(UserError, ValueError):
    """Options that do not fit together (a flag, a recipe value, a model configuration key)."""


def exit_on_user_error(main, *args, rank: int = None):
    """``main(*args)``; a :class:`UserError` ends the process with ``error: <message>`` (one line,
    on stderr) and exit status 1, like ``sys.exit("error: ...")``.

    Under DDP every rank takes the same decisions, so every rank raises the same error:
    only rank 0 (``RANK`` in the environment, or ``rank``) prints it, the others exit quietly.
    """
    try:
        return main(*args)
    except UserError as exc:
        if (int(os.environ.get("RANK", "0")) if rank is None else rank) == 0:
            raise SystemExit(f"error: {' '.join(str(exc).split())}") from None
        raise SystemExit(1) from None

"""Self-describing checkpoints: atomic writes, one-line errors, latest-valid lookup.

This module reads and writes checkpoint *files*; turning one into a model is
``model.weights.load_detector``'s job (the one model loader of the repository).
"""
import argparse
import glob
import logging
import os
import pickle
import re

import torch

from utils.runtime.atomic_io import atomic_write
from utils.runtime.errors import UserError

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = "checkpoint_e{epoch:04d}_i{iteration:08d}.pth"
_CHECKPOINT_RE = re.compile(r"checkpoint_e(\d+)_i(\d+)\.pth$")


class CheckpointError(UserError, ValueError):
    """A checkpoint or weights file that cannot be used; the message names the file and the reason."""


class WeightsFileNotFoundError(UserError, FileNotFoundError):
    """A checkpoint or weights path that does not exist."""


def save_checkpoint(state: dict, path: str) -> None:
    """Write ``state`` to ``path`` atomically (``utils.runtime.atomic_io``): never half a file."""
    atomic_write(path, lambda f: torch.save(state, f))


def torch_load(path: str, what: str = "checkpoint", map_location="cpu"):
    """``torch.load(path, weights_only=True)`` with every failure as one :class:`CheckpointError` line.

    ``what`` names the kind of file in messages ("checkpoint", "weights file", ...).
    Only plain containers, tensors and numbers load (nothing that runs code), plus the
    argparse Namespace that torchvision's references store beside their weights.
    """
    if not os.path.isfile(path):
        raise WeightsFileNotFoundError(f"{what} not found: {path}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means the same to the user
        raise CheckpointError(f"{what} {path} is unusable: {_load_failure(exc)}") from exc


def _load_failure(exc: Exception) -> str:
    """One line out of torch.load's many; its weights-only refusal even says the file "can still be loaded"."""
    message = str(exc)
    detail = re.search(r"WeightsUnpickler error: (Unsupported [^.\n]*)", message)
    if isinstance(exc, pickle.UnpicklingError) and detail:
        return f"it holds objects other than tensors and plain containers ({detail.group(1)})"
    first_line = next((line.strip() for line in message.splitlines() if line.strip()), "")
    if isinstance(exc, RuntimeError) and "zip archive" in message:
        return f"corrupt or truncated ({first_line.split('.')[0]})"
    return f"corrupt or truncated, or not a PyTorch file ({type(exc).__name__}: {first_line})"


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """A checkpoint dict of this repository (it has a ``model`` entry), or a :class:`CheckpointError`."""
    checkpoint = torch_load(path, "checkpoint", map_location)
    if not isinstance(checkpoint, dict) or "model" not in checkpoint:
        keys = sorted(checkpoint)[:8] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise CheckpointError(f"{path} is not a checkpoint of this repository (no 'model' entry; has {keys})")
    return checkpoint


def load_state_dict_checked(model: torch.nn.Module, state_dict: dict, source: str) -> None:
    """``load_state_dict(strict=True)`` with a one-line error naming the file and the mismatch."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        parts = []
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatches (e.g. {mismatched[0]})")
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        raise CheckpointError(f"weights in {source} do not fit this model: " + "; ".join(parts))
    model.load_state_dict(state_dict)


def checkpoint_path(output_dir: str, epoch: int, iteration: int) -> str:
    return os.path.join(output_dir, CHECKPOINT_PATTERN.format(epoch=epoch, iteration=iteration))


def list_checkpoints(output_dir: str) -> list:
    """Training checkpoints in ``output_dir``, newest (highest iteration) first."""
    found = []
    for path in glob.glob(os.path.join(output_dir, "checkpoint_e*_i*.pth")):
        match = _CHECKPOINT_RE.search(os.path.basename(path))
        if match:
            found.append(((int(match.group(2)), int(match.group(1))), path))
    return [path for _, path in sorted(found, reverse=True)]


def find_resumable_checkpoint(output_dir: str, map_location="cpu"):
    """The newest checkpoint in ``output_dir`` that loads, or None; corrupt ones are reported and skipped."""
    for path in list_checkpoints(output_dir):
        try:
            return path, load_checkpoint(path, map_location)
        except CheckpointError as exc:
            logger.warning("skipping unusable checkpoint: %s", exc)
    return None, None


def prune_checkpoints(output_dir: str, keep: int) -> None:
    """Delete all but the ``keep`` newest training checkpoints (called after a new one is complete)."""
    for path in list_checkpoints(output_dir)[max(keep, 1):]:
        try:
            os.remove(path)
        except OSError as exc:
            logger.warning("could not remove old checkpoint %s: %s", path, exc)

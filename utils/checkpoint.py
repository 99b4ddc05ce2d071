"""Self-describing checkpoints: atomic writes, clear errors, latest-valid lookup."""
import glob
import logging
import os
import re

import torch

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = "checkpoint_e{epoch:04d}_i{iteration:08d}.pth"
_CHECKPOINT_RE = re.compile(r"checkpoint_e(\d+)_i(\d+)\.pth$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the reason."""


def save_checkpoint(state: dict, path: str) -> None:
    """Write ``state`` to ``path`` atomically: a crash mid-write leaves the old file (or none), never half a file.

    The bytes go to a temporary file in the same directory (so the rename stays
    on one filesystem), are flushed to disk, then renamed over ``path``.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp_path = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp_path, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """Load a checkpoint dict, turning every failure into one :class:`CheckpointError` line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        # Our checkpoints hold plain containers, tensors and numbers; weights_only
        # refuses anything that would execute code on load.
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means the same to the user
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated: {type(exc).__name__}: {exc}") from exc
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


def load_model_from_checkpoint(path: str, map_location="cpu"):
    """Rebuild the model a checkpoint describes and load its weights.

    Returns ``(model, checkpoint)``; the model is in eval mode on ``map_location``.
    ``checkpoint["categories"]`` maps label k to ``categories[k]["id"]`` / ``["name"]``.
    """
    from model import build_retinanet  # local import: utils must not depend on model at import time

    checkpoint = load_checkpoint(path, map_location)
    if "model_config" not in checkpoint:
        raise CheckpointError(f"{path} has no 'model_config': it cannot rebuild the model on its own")
    model = build_retinanet(**checkpoint["model_config"])
    load_state_dict_checked(model, checkpoint["model"], path)
    return model.to(map_location).eval(), checkpoint


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

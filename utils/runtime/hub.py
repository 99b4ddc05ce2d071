"""Published weights (torchvision's weights API) through torch's hub cache, with one-line errors offline.

torchvision downloads ImageNet and COCO weights on first use into
``$TORCH_HOME/hub/checkpoints`` (default ``~/.cache/torch/hub/checkpoints``) and reads them
from there afterwards. Most clusters have no internet: there the download fails with a
long urllib traceback, or, behind a firewall that drops packets, hangs forever.
:func:`fetch_published_weights` bounds the wait and turns any such failure into one
:class:`WeightsUnavailableError` naming the file it looked for, the folder to copy it
into, and what else the user can pass instead.
"""
import http.client
import os
import pickle
import socket
from urllib.parse import urlparse

import torch

from utils.runtime.checkpoint import CheckpointError

# Seconds without a byte from the server before a download counts as failed (per socket
# operation, not for the whole file): long enough for a slow mirror, short enough that
# a blackholed network ends the run in a minute instead of never.
DOWNLOAD_TIMEOUT_S = 60

# What a failed download or an unreadable cached file raises: URLError, HTTPError, timeouts
# and SSL errors are OSErrors; a hash mismatch or a bad zip a RuntimeError.
_FETCH_ERRORS = (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError, http.client.HTTPException)


class WeightsUnavailableError(CheckpointError):
    """Published weights that are not in the hub cache and could not be downloaded (no internet, proxy, ...)."""


def hub_cache_dir() -> str:
    """The folder torch.hub reads downloaded weights from (``$TORCH_HOME/hub/checkpoints``)."""
    return os.path.join(torch.hub.get_dir(), "checkpoints")


def weights_file_name(weights) -> str:
    """The file name torch.hub stores ``weights`` (a torchvision ``WeightsEnum`` member) under."""
    return os.path.basename(urlparse(weights.url).path)


def fetch_published_weights(weights, what: str, instead: str, map_location="cpu") -> dict:
    """The state dict of torchvision ``weights``, from the hub cache or downloaded into it once.

    Args:
        weights: a torchvision ``WeightsEnum`` member (``ResNet50_Weights.IMAGENET1K_V2``).
        what: what they are, for the message ("ImageNet weights of the resnet50 backbone").
        instead: the other ways out, ending the message ("pass a local copy as --weights PATH").

    Raises:
        WeightsUnavailableError: one line naming the file, the cache folder and ``instead``.
    """
    name = f"{type(weights).__name__}.{weights.name}"
    file_name, cache_dir = weights_file_name(weights), hub_cache_dir()
    cached = os.path.isfile(os.path.join(cache_dir, file_name))
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)  # urllib's urlopen in torch.hub waits forever otherwise
    try:
        return weights.get_state_dict(progress=True, check_hash=True, map_location=map_location)
    except _FETCH_ERRORS as exc:
        reason = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
        if cached:
            raise WeightsUnavailableError(
                f"{what} ({name}): the cached file {os.path.join(cache_dir, file_name)} is unusable ({reason}); "
                f"delete it to download it again, or {instead}") from exc
        raise WeightsUnavailableError(
            f"{what} ({name}) are not in the cache and could not be downloaded from {weights.url} ({reason}); "
            f"without internet, copy {file_name} into {cache_dir}, or {instead}") from exc
    finally:
        socket.setdefaulttimeout(previous_timeout)

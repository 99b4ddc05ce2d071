"""Where and in which precision the model runs: one answer for every entry script.

``--device auto|cpu|cuda|cuda:N`` and ``--amp none|auto|fp16|bf16`` mean the same in
train.py, evaluation.py and inference.py; evaluation inside training uses the training's dtype.
"""
import contextlib

import torch

from utils.runtime.errors import UserError

AMP_CHOICES = ("none", "auto", "fp16", "bf16")


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto``: this process's GPU when CUDA is available, else the CPU. ``cuda`` under torchrun
    means the rank's own GPU (``LOCAL_RANK``); an unavailable CUDA is the user's error."""
    name = str(name or "auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: no CUDA device is available here (use --device cpu)")
        if name == "cuda":
            name = f"cuda:{local_rank}"
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise UserError(f"--device {name}: {exc}") from None


def autocast_dtype(amp, device: torch.device):
    """``--amp`` -> the autocast dtype, or None for full precision.

    ``auto`` (also a bare ``--amp`` or True) is fp16 on CUDA and bf16 elsewhere (the CPU
    has fast bf16 kernels but no fp16 ones); "none", None and False are fp32.
    """
    if amp in (None, False, "none"):
        return None
    if amp in (True, "auto"):
        return torch.float16 if torch.device(device).type == "cuda" else torch.bfloat16
    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16}
    if amp not in dtypes:
        raise UserError(f"--amp {amp}: choose one of {', '.join(AMP_CHOICES)}")
    return dtypes[amp]


def autocast(device: torch.device, dtype):
    """``torch.autocast`` for ``dtype``, or a no-op context for full precision."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)

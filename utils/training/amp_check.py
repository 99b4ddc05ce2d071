"""Mixed-precision self-check before training: one batch's loss under autocast against fp32.

A broken AMP setup (a GPU or driver whose half-precision kernels misbehave, an fp16
overflow in a custom layer, a model edit that is not autocast-safe) does not fail
loudly: the run trains, slowly or badly. Like ultralytics' ``check_amp``, train.py
therefore runs the first batch twice before the first step -- in fp32 and under
autocast, without gradients -- and warns, naming the difference, when the two losses
disagree by more than a tolerance. It only warns; ``--amp-check off`` skips it.

The check leaves no trace: BatchNorm statistics and the RNG states are restored, and
compiled parts run eagerly for it (``torch.compiler.set_stance("force_eager")``), so it
costs two forward passes, not a compilation.

Under DDP every rank checks its own first batch, and the ranks decide together from
the losses averaged over ranks (:func:`utils.runtime.distributed.agree`), so every rank enters
the same collectives and reaches the same verdict; rank 0 logs it.
"""
import contextlib
import logging
import math
import random
import sys
from dataclasses import dataclass, field
from typing import Optional

import torch

from utils.runtime.device import autocast
from utils.runtime.distributed import agree, get_world_size, is_main_process

logger = logging.getLogger(__name__)

# Relative difference of a loss term, as a fraction of the fp32 total loss, past which the
# check warns. At initialisation both fp16 and bf16 agree with fp32 to about 1e-3 (R-18 and
# R-50, measured on CPU); 5 % leaves room for trained weights while still catching a broken
# kernel or an overflow, which move the loss by far more (or make it inf / NaN).
DEFAULT_TOLERANCE = 0.05

DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass
class AmpCheckResult:
    """Losses of one batch (means over DDP ranks) and the verdict.

    ``relative_difference``: per loss term ``|amp - fp32| / |fp32 total|``;
    ``warning``: the message logged, or None when the two agree.
    """
    dtype: str
    fp32: dict
    amp: dict
    relative_difference: dict = field(default_factory=dict)
    tolerance: float = DEFAULT_TOLERANCE
    warning: Optional[str] = None
    skipped: Optional[str] = None

    @property
    def passed(self) -> bool:
        return self.warning is None


def check_amp(model, batches, device, amp_dtype, tolerance: float = DEFAULT_TOLERANCE) -> AmpCheckResult:
    """Compare the first batch's losses under autocast ``amp_dtype`` with fp32; warn past ``tolerance``.

    Args:
        model: the detector, not its DDP wrapper; in training mode ``model(images, targets)``
            returns a dict of scalar losses (``{"classification": ..., "bbox_regression": ...}``).
        batches: an iterable of ``(images, targets, ...)`` (the training loader); only its first
            batch is read.
        device: where the model runs (for autocast).
        amp_dtype: ``torch.float16`` or ``torch.bfloat16``.

    Every DDP rank must call this at the same point (it enters two collectives).
    """
    name = DTYPE_NAMES.get(amp_dtype, str(amp_dtype))
    images, targets = [], []
    with _no_side_effects(model, device):
        first = next(iter(batches), None)
        if first is not None:
            images, targets = first[0], first[1]
        # A rank whose first batch holds no readable image cannot check; then no rank does,
        # so that all of them enter the same collectives (the loss averages over ranks).
        (num_empty,) = agree(0 if images else 1)
        if num_empty:
            result = AmpCheckResult(name, {}, {}, tolerance=tolerance, skipped="a rank's first batch is empty")
            if is_main_process():
                logger.info("AMP check skipped: %s", result.skipped)
            return result
        fp32 = _losses(model, images, targets, device, None)
        amp = _losses(model, images, targets, device, amp_dtype)
    keys = sorted(fp32)
    # Means over ranks: one verdict everywhere. A non-finite loss on any rank makes the mean non-finite.
    summed = agree(*(fp32[k] for k in keys), *(amp[k] for k in keys))
    ranks = get_world_size()
    fp32 = {k: summed[i] / ranks for i, k in enumerate(keys)}
    amp = {k: summed[len(keys) + i] / ranks for i, k in enumerate(keys)}
    result = AmpCheckResult(name, fp32, amp, tolerance=tolerance)
    result.warning = _verdict(result, keys)
    if is_main_process():
        if result.warning:
            logger.warning(result.warning)
        else:
            differences = ", ".join(f"{k} {100 * result.relative_difference[k]:.2f} %" for k in keys)
            logger.info("AMP check passed: %s loss %.4f vs fp32 %.4f on the first batch (%s; tolerance %g %%)",
                        name, sum(amp.values()), sum(fp32.values()), differences, 100 * tolerance)
    return result


def _verdict(result: AmpCheckResult, keys: list) -> Optional[str]:
    fp32_total, amp_total = sum(result.fp32.values()), sum(result.amp.values())
    advice = ("mixed precision may be broken for this model or device: compare --amp none, try the other "
              "--amp dtype, check the GPU driver; --amp-check off skips this check")
    if not math.isfinite(fp32_total):
        return (f"AMP check: the fp32 loss of the first batch is itself not finite ({_show(result.fp32)}), "
                "so it says nothing about mixed precision; check the data and the learning rate")
    if not math.isfinite(amp_total):
        return (f"AMP check: the {result.dtype} loss of the first batch is not finite ({_show(result.amp)}) "
                f"while fp32 gives {_show(result.fp32)}: {advice}")
    scale = max(abs(fp32_total), 1e-12)
    result.relative_difference = {k: abs(result.amp[k] - result.fp32[k]) / scale for k in keys}
    worst = max(keys, key=lambda k: result.relative_difference[k])
    if result.relative_difference[worst] <= result.tolerance:
        return None
    return (f"AMP check: {result.dtype} and fp32 disagree on the first batch: {worst} loss "
            f"{result.amp[worst]:.4f} vs {result.fp32[worst]:.4f}, a difference of "
            f"{100 * result.relative_difference[worst]:.1f} % of the total loss (tolerance {100 * result.tolerance:g} %; "
            f"{result.dtype} {_show(result.amp)}, fp32 {_show(result.fp32)}): {advice}")


def _show(losses: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in sorted(losses.items()))


@torch.no_grad()
def _losses(model, images, targets, device, amp_dtype) -> dict:
    # The same random draws (multi-scale size) for both passes, so they see the same input.
    with torch.random.fork_rng(devices=_cuda_devices(device)):
        state = random.getstate()
        try:
            with autocast(device, amp_dtype):
                losses = model(images, targets)
        finally:
            random.setstate(state)
    return {k: float(v.float()) for k, v in losses.items()}


def _eager():
    """Compiled parts run eagerly inside (no compilation for the check). Nothing can be compiled
    unless dynamo was imported, and importing it costs seconds, so only then."""
    if "torch._dynamo" in sys.modules and hasattr(torch.compiler, "set_stance"):
        return torch.compiler.set_stance("force_eager")
    return contextlib.nullcontext()


def _cuda_devices(device) -> list:
    device = torch.device(device)
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


@contextlib.contextmanager
def _no_side_effects(model, device):
    """Restore buffers (BatchNorm running statistics), RNG states and the train/eval mode afterwards."""
    buffers = {name: buffer.detach().clone() for name, buffer in model.named_buffers()}
    python_state = random.getstate()
    was_training = model.training
    model.train()
    try:
        with torch.random.fork_rng(devices=_cuda_devices(device)), _eager():
            yield
    finally:
        with torch.no_grad():
            for name, buffer in model.named_buffers():
                if name in buffers:
                    buffer.copy_(buffers[name])
        random.setstate(python_state)
        model.train(was_training)

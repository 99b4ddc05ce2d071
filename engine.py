"""One training epoch: forward, backward, step, logging. Used by train.py.

Every decision inside the loop that could differ between DDP ranks (skip this step,
stop the run) is agreed by all ranks first (``utils.runtime.distributed.agree``): a rank that
decided alone would leave the others waiting in the next collective until the
process-group timeout.
"""
import dataclasses
import logging
import math
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from utils.runtime.checkpoint import list_checkpoints
from utils.runtime.device import autocast
from utils.runtime.distributed import agree, all_gather_object, all_reduce_mean, get_world_size, is_main_process
from utils.runtime.errors import UserError

logger = logging.getLogger(__name__)


class NonFiniteLossError(UserError):
    """Training diverged: the loss stayed NaN or inf; the message names the last good checkpoint."""


class TooManyBadImagesError(UserError):
    """More unreadable training images than ``--max-bad-images`` allows."""


@dataclass
class TrainState:
    """Where a run is and what it has counted so far; saved in every checkpoint, restored on resume.

    ``epoch`` / ``batch_in_epoch``: the next batch to train. Counts are summed over DDP ranks.
    """
    epoch: int = 0
    batch_in_epoch: int = 0
    iteration: int = 0
    bad_images: int = 0
    non_finite_steps: int = 0
    consecutive_non_finite: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_checkpoint(cls, checkpoint: dict) -> "TrainState":
        """The state a checkpoint saved (checkpoints written before the counters were saved count from 0)."""
        return cls(**{f.name: int(checkpoint.get(f.name, 0)) for f in dataclasses.fields(cls)})


def train_one_epoch(model, optimizer, lr_scheduler, scaler, loader, device, state: TrainState, config, writer,
                    save_checkpoint, stop_request=None, bad_image_limit: int = 0, amp_dtype=None) -> tuple:
    """Train what remains of epoch ``state.epoch`` (from ``state.batch_in_epoch``).

    Args:
        loader: yields ``(images, targets, bad)`` (``utils.data.loaders.build_train_loader``);
            ``bad`` lists the messages of this batch's unreadable images (skipped).
        state: updated in place and returned.
        config: the run's ``recipes.TrainConfig`` (epochs, iters, clip_grad_norm, print_freq,
            checkpoint_every, max_iters, max_non_finite, output_dir).
        save_checkpoint: ``save_checkpoint(state)`` writes a checkpoint (rank 0).
        bad_image_limit: the run stops past this many skipped images (all ranks together).
        amp_dtype: autocast dtype, or None for fp32.

    Losses are accumulated as device tensors and read back only every ``config.print_freq``
    iterations, so logging does not stall the GPU each step.

    Returns ``(state, finished)``: finished is False when ``--max-iters`` or a SIGTERM / SIGINT
    (``stop_request``) stopped the run early, after a checkpoint.
    """
    model.train()
    batch_sampler = loader.batch_sampler
    total_batches = len(batch_sampler.batch_sampler)
    world_size = get_world_size()
    # With --iters the schedule may end part-way through its last epoch.
    remaining = config.total_iters(total_batches) - state.iteration
    progress = tqdm(loader, total=max(0, min(len(batch_sampler), remaining)),
                    desc=f"epoch {state.epoch + 1}/{config.num_epochs(total_batches)}",
                    disable=not is_main_process(), dynamic_ncols=True)
    running = {"classification": torch.zeros((), device=device), "bbox_regression": torch.zeros((), device=device)}
    window_images, window_start, window_iters = 0, time.time(), 0
    recent_bad = []  # messages of skipped images since this process started, for the budget's error
    for batch_in_epoch, (images, targets, bad) in enumerate(progress, start=batch_sampler.start_batch):
        state.batch_in_epoch = batch_in_epoch
        # One tiny CPU collective per step: how many images every rank skipped, and whether
        # any rank's batch is empty. An empty batch on one rank skips the step on all.
        num_bad, num_empty = agree(len(bad), 0 if images else 1)
        if num_bad:
            recent_bad = _count_bad_images(state, bad, int(num_bad), recent_bad, bad_image_limit)
        if num_empty:
            if is_main_process():
                logger.warning("iteration %d: %d rank(s) have no readable image in their batch; step skipped "
                               "on every rank", state.iteration, int(num_empty))
            continue
        with autocast(device, amp_dtype):
            loss_dict = model(images, targets)
        loss = loss_dict["classification"] + loss_dict["bbox_regression"]
        # One host sync per step: a NaN/inf loss must never reach the weights. Every
        # rank must skip together (or DDP's gradient all-reduce would hang), hence the
        # reduction. The fp16 GradScaler separately skips steps whose gradients overflow.
        if all_reduce_mean(torch.isfinite(loss).float()) < 1:
            _skip_non_finite_step(state, loss_dict, config)
            continue
        state.consecutive_non_finite = 0
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if config.clip_grad_norm > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        lr_scheduler.step()
        state.iteration += 1
        state.batch_in_epoch = batch_in_epoch + 1
        for key in running:
            running[key] += loss_dict[key].detach()
        window_images += len(images)
        window_iters += 1

        end_of_schedule = bool(config.iters) and state.iteration >= config.iters
        if state.iteration % config.print_freq == 0 or batch_in_epoch + 1 == total_batches or end_of_schedule:
            elapsed = time.time() - window_start
            means = {k: all_reduce_mean(v / window_iters).item() for k, v in running.items()}
            record = {"type": "train", "epoch": state.epoch + 1, "iteration": state.iteration,
                      "lr": optimizer.param_groups[0]["lr"], "loss": sum(means.values()), **means,
                      "images_per_s": window_images * world_size / max(elapsed, 1e-9),
                      "bad_images": state.bad_images, "non_finite_steps": state.non_finite_steps}
            if not math.isfinite(record["loss"]):
                raise NonFiniteLossError(f"non-finite loss by iteration {state.iteration} (fp16 scaler could not "
                                         f"recover); {_last_good_checkpoint(config.output_dir)}")
            writer.write(record, step=state.iteration)
            progress.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}",
                                 img_s=f"{record['images_per_s']:.1f}", bad=state.bad_images)
            running = {k: torch.zeros_like(v) for k, v in running.items()}
            window_images, window_start, window_iters = 0, time.time(), 0
        if config.checkpoint_every and state.iteration % config.checkpoint_every == 0 \
                and batch_in_epoch + 1 < total_batches:
            save_checkpoint(state)
        if end_of_schedule:  # the epoch (and the run) ends here, as if the epoch were over
            break
        stop_here = bool(config.max_iters and state.iteration >= config.max_iters)
        (num_stopping,) = agree(stop_request is not None and stop_request.requested)
        if num_stopping:
            logger.warning("stopping at iteration %d on %s", state.iteration,
                           stop_request.signal_name or "another rank's signal")
        if stop_here or num_stopping:
            save_checkpoint(state)
            return state, False
    state.epoch, state.batch_in_epoch = state.epoch + 1, 0
    return state, True


def _skip_non_finite_step(state: TrainState, loss_dict: dict, config) -> None:
    """Count a non-finite loss and skip its step; several in a row mean the run has diverged."""
    state.non_finite_steps += 1
    state.consecutive_non_finite += 1
    values = {k: float(v.detach()) for k, v in loss_dict.items()}
    logger.warning("non-finite loss %s at iteration %d (epoch %d, batch %d): step skipped (%d so far)",
                   values, state.iteration, state.epoch + 1, state.batch_in_epoch, state.non_finite_steps)
    if state.consecutive_non_finite >= config.max_non_finite:
        raise NonFiniteLossError(
            f"{state.consecutive_non_finite} non-finite losses in a row, the last at iteration {state.iteration} "
            f"(epoch {state.epoch + 1}, batch {state.batch_in_epoch}): training diverged. "
            f"{_last_good_checkpoint(config.output_dir)}. Try a lower --lr, --clip-grad-norm, or --amp none.")


def _last_good_checkpoint(output_dir: str) -> str:
    checkpoints = list_checkpoints(output_dir)
    return f"Last good checkpoint: {checkpoints[0] if checkpoints else 'none written yet'}"


def _count_bad_images(state: TrainState, bad: list, num_bad: int, recent: list, limit: int) -> list:
    """Add this step's skipped images (``num_bad`` over all ranks) to the count; past ``limit``
    every rank raises the same :class:`TooManyBadImagesError`. Returns the recent messages."""
    messages = [message for rank_messages in all_gather_object(bad) for message in rank_messages]
    first = state.bad_images
    state.bad_images += num_bad
    if is_main_process():
        for number, message in enumerate(messages, start=first + 1):
            logger.warning("skipped unreadable image (%d so far): %s", number, message)
    recent = (recent + messages)[-5:]
    if state.bad_images > limit:
        raise TooManyBadImagesError(
            f"{state.bad_images} unreadable training images skipped, more than --max-bad-images {limit}; "
            f"the last ones: {' | '.join(recent)}")
    return recent

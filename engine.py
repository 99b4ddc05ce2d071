"""One training epoch: forward, backward, step, logging. Used by train.py."""
import logging
import math
import time

import torch
from tqdm import tqdm

from utils.distributed import all_reduce_mean, is_main_process

logger = logging.getLogger("retinanet")


class NonFiniteLossError(RuntimeError):
    pass


def train_one_epoch(model, optimizer, lr_scheduler, scaler, loader, device, epoch: int, iteration: int, args,
                    writer, save_checkpoint, stop_request=None) -> tuple:
    """Train one epoch (or what remains of it after a mid-epoch resume).

    Losses are accumulated as device tensors and read back only every
    ``args.print_freq`` iterations, so logging does not stall the GPU each step.

    Returns ``(iteration, finished)``: finished is False when ``--max-iters`` or a
    SIGTERM / SIGINT (``stop_request``) stopped the run early, after a checkpoint.
    """
    model.train()
    batch_sampler = loader.batch_sampler
    first_batch = batch_sampler.start_batch
    total_batches = len(batch_sampler.batch_sampler)
    autocast_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.amp)
    progress = tqdm(loader, total=len(batch_sampler), desc=f"epoch {epoch + 1}/{args.epochs}",
                    disable=not is_main_process(), dynamic_ncols=True)
    running = {"classification": torch.zeros((), device=device), "bbox_regression": torch.zeros((), device=device)}
    window_images, window_start, window_iters = 0, time.time(), 0
    for batch_in_epoch, (images, targets, bad) in enumerate(progress, start=first_batch):
        if bad:
            _count_bad_images(args, bad)
        if not images:
            continue
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss_dict = model(images, targets)
        loss = loss_dict["classification"] + loss_dict["bbox_regression"]
        # One host sync per step: a NaN/inf loss must never reach the weights. Every
        # rank must skip together (or DDP's gradient all-reduce would hang), hence the
        # reduction. The fp16 GradScaler separately skips steps whose gradients overflow.
        if all_reduce_mean(torch.isfinite(loss).float()) < 1:
            _skip_non_finite_step(args, loss_dict, iteration, epoch, batch_in_epoch)
            continue
        args.consecutive_non_finite = 0
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if args.clip_grad_norm > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        lr_scheduler.step()
        iteration += 1
        for key in running:
            running[key] += loss_dict[key].detach()
        window_images += len(images)
        window_iters += 1

        if iteration % args.print_freq == 0 or batch_in_epoch + 1 == total_batches:
            elapsed = time.time() - window_start
            means = {k: all_reduce_mean(v / window_iters).item() for k, v in running.items()}
            record = {"type": "train", "epoch": epoch + 1, "iteration": iteration, "lr": optimizer.param_groups[0]["lr"],
                      "loss": sum(means.values()), **means,
                      "images_per_s": window_images * args.world_size / max(elapsed, 1e-9),
                      "bad_images": args.bad_image_count, "non_finite_steps": getattr(args, "non_finite_count", 0)}
            if not math.isfinite(record["loss"]):
                raise NonFiniteLossError(f"non-finite loss by iteration {iteration} (fp16 scaler could not recover); "
                                         f"the last good checkpoint is in {args.output_dir}")
            writer.write(record, step=iteration)
            progress.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}",
                                 img_s=f"{record['images_per_s']:.1f}", bad=args.bad_image_count)
            running = {k: torch.zeros_like(v) for k, v in running.items()}
            window_images, window_start, window_iters = 0, time.time(), 0
        if args.checkpoint_every and iteration % args.checkpoint_every == 0 and batch_in_epoch + 1 < total_batches:
            save_checkpoint(epoch, batch_in_epoch + 1, iteration)
        stop = bool(args.max_iters and iteration >= args.max_iters)
        if stop_request is not None and stop_request.should_stop(iteration):
            logger.warning("stopping at iteration %d on %s", iteration, stop_request.signal_name or "another rank's signal")
            stop = True
        if stop:
            save_checkpoint(epoch, batch_in_epoch + 1, iteration)
            return iteration, False
    return iteration, True


def _skip_non_finite_step(args, loss_dict, iteration: int, epoch: int, batch_in_epoch: int) -> None:
    """Count a non-finite loss and skip its step; several in a row mean the run has diverged."""
    from utils.checkpoint import list_checkpoints  # local: only needed on this rare path
    args.non_finite_count = getattr(args, "non_finite_count", 0) + 1
    args.consecutive_non_finite = getattr(args, "consecutive_non_finite", 0) + 1
    values = {k: float(v.detach()) for k, v in loss_dict.items()}
    logger.warning("non-finite loss %s at iteration %d (epoch %d, batch %d): step skipped (%d so far)",
                   values, iteration, epoch + 1, batch_in_epoch, args.non_finite_count)
    if args.consecutive_non_finite >= args.max_non_finite:
        checkpoints = list_checkpoints(args.output_dir)
        last_good = checkpoints[0] if checkpoints else "none written yet"
        raise NonFiniteLossError(
            f"{args.consecutive_non_finite} non-finite losses in a row, the last at iteration {iteration} "
            f"(epoch {epoch + 1}, batch {batch_in_epoch}): training diverged. Last good checkpoint: {last_good}. "
            f"Try a lower --lr, --clip-grad-norm, or --amp none.")


def _count_bad_images(args, messages: list) -> None:
    args.bad_image_count += len(messages)
    for message in messages:
        logger.warning("skipped unreadable image (%d so far): %s", args.bad_image_count, message)
    limit = args.max_bad_images if args.max_bad_images >= 1 else args.max_bad_images * args.num_train_images
    if args.bad_image_count > max(limit, 0):
        raise RuntimeError(f"{args.bad_image_count} unreadable images skipped, more than --max-bad-images "
                           f"{args.max_bad_images}; last: {messages[-1]}")

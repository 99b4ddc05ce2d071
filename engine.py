"""The training step and the evaluation loop, as torchvision's and DETR's engine.py hold both:
``train_one_epoch`` (train.py) and ``evaluate`` (train.py after an epoch, evaluation.py).

Every decision inside the training loop that could differ between DDP ranks (skip this step,
stop the run) is agreed by all ranks first (``utils.runtime.distributed.agree``): a rank that
decided alone would leave the others waiting in the next collective until the
process-group timeout.
"""
import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from pycocotools.coco import COCO
from torch.utils.data import DataLoader
from tqdm import tqdm

from model.tiling import TiledDetector, TileOptions, tile_detector
from utils.evaluation.coco_eval import (format_metrics_table, per_category_metrics, predictions_to_coco_results,
                                        score_coco_results)
from utils.evaluation.pr_plot import plot_pr_curves
from utils.runtime import distributed
from utils.runtime.atomic_io import write_json_atomic
from utils.runtime.checkpoint import list_checkpoints
from utils.runtime.device import autocast, autocast_dtype
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

    The host reads a device value back once per step (:func:`_finite_on_every_rank`) and, every
    ``config.print_freq`` steps, once per loss term (:meth:`LossWindow.mean_losses`), so logging
    does not stall the GPU each step (benchmarks/host_sync.py counts them).

    Returns ``(state, finished)``: finished is False when ``--max-iters`` or a SIGTERM / SIGINT
    (``stop_request``) stopped the run early, after a checkpoint.
    """
    model.train()
    batch_sampler = loader.batch_sampler
    total_batches = len(batch_sampler.batch_sampler)
    progress = _progress_bar(loader, state, config, total_batches)
    window = LossWindow(device)
    bad_images = BadImageBudget(bad_image_limit)
    for batch_in_epoch, (images, targets, bad) in enumerate(progress, start=batch_sampler.start_batch):
        state.batch_in_epoch = batch_in_epoch
        if _skip_unreadable_batch(state, images, bad, bad_images):
            continue
        loss_dict = _train_step(model, optimizer, lr_scheduler, scaler, images, targets, device, state, config,
                                amp_dtype)
        if loss_dict is None:  # non-finite on some rank: skipped on every rank
            continue
        state.batch_in_epoch = batch_in_epoch + 1
        window.add(loss_dict, len(images))
        last_batch = batch_in_epoch + 1 == total_batches
        end_of_schedule = bool(config.iters) and state.iteration >= config.iters
        if state.iteration % config.print_freq == 0 or last_batch or end_of_schedule:
            _log_window(window, state, optimizer, writer, progress, config.output_dir)
        if config.checkpoint_every and state.iteration % config.checkpoint_every == 0 and not last_batch:
            save_checkpoint(state)
        if end_of_schedule:  # the epoch (and the run) ends here, as if the epoch were over
            break
        if _stop_requested(state, config, stop_request):
            save_checkpoint(state)
            return state, False
    state.epoch, state.batch_in_epoch = state.epoch + 1, 0
    return state, True


def _progress_bar(loader, state: TrainState, config, total_batches: int) -> tqdm:
    # With --iters the schedule may end part-way through its last epoch.
    remaining = config.total_iters(total_batches) - state.iteration
    return tqdm(loader, total=max(0, min(len(loader.batch_sampler), remaining)),
                desc=f"epoch {state.epoch + 1}/{config.num_epochs(total_batches)}",
                disable=not distributed.is_main_process(), dynamic_ncols=True)


def _train_step(model, optimizer, lr_scheduler, scaler, images, targets, device, state: TrainState, config,
                amp_dtype):
    """Forward, the non-finite guard, backward and the update; the loss dict, or None when the step was skipped."""
    with autocast(device, amp_dtype):
        loss_dict = model(images, targets)
    loss = loss_dict["classification"] + loss_dict["bbox_regression"]
    if not _finite_on_every_rank(loss):
        _skip_non_finite_step(state, loss_dict, config)
        return None
    state.consecutive_non_finite = 0
    _optimizer_step(model, optimizer, lr_scheduler, scaler, loss, config.clip_grad_norm)
    state.iteration += 1
    return loss_dict


def _finite_on_every_rank(loss: torch.Tensor) -> bool:
    # The step's one host sync: a NaN/inf loss must never reach the weights. Every rank must
    # skip together (or DDP's gradient all-reduce would hang), hence the reduction. The fp16
    # GradScaler separately skips steps whose gradients overflow.
    return not distributed.all_reduce_mean(torch.isfinite(loss).float()) < 1


def _optimizer_step(model, optimizer, lr_scheduler, scaler, loss: torch.Tensor, clip_grad_norm: float) -> None:
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if clip_grad_norm > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
    scaler.step(optimizer)
    scaler.update()
    lr_scheduler.step()


class LossWindow:
    """The losses of the steps since the last log record, summed on the device; read back (and
    averaged over ranks) only when a record is written."""

    def __init__(self, device):
        self.sums = {"classification": torch.zeros((), device=device),
                     "bbox_regression": torch.zeros((), device=device)}
        self.images, self.steps, self.start = 0, 0, time.time()

    def add(self, loss_dict: dict, num_images: int) -> None:
        for key in self.sums:
            self.sums[key] += loss_dict[key].detach()
        self.images += num_images
        self.steps += 1

    def mean_losses(self) -> dict:
        """Each loss averaged over the window's steps and the DDP ranks: the logging host read."""
        return {key: distributed.all_reduce_mean(total / self.steps).item() for key, total in self.sums.items()}

    def restart(self) -> None:
        self.sums = {key: torch.zeros_like(total) for key, total in self.sums.items()}
        self.images, self.steps, self.start = 0, 0, time.time()


def _log_window(window: LossWindow, state: TrainState, optimizer, writer, progress, output_dir: str) -> None:
    """One ``train`` record (log.jsonl, progress bar) for the window, which then restarts; a
    non-finite mean loss (the fp16 scaler could not recover) ends the run."""
    elapsed = time.time() - window.start
    means = window.mean_losses()
    record = {"type": "train", "epoch": state.epoch + 1, "iteration": state.iteration,
              "lr": optimizer.param_groups[0]["lr"], "loss": sum(means.values()), **means,
              "images_per_s": window.images * distributed.get_world_size() / max(elapsed, 1e-9),
              "bad_images": state.bad_images, "non_finite_steps": state.non_finite_steps}
    if not math.isfinite(record["loss"]):
        raise NonFiniteLossError(f"non-finite loss by iteration {state.iteration} (fp16 scaler could not "
                                 f"recover); {_last_good_checkpoint(output_dir)}")
    writer.write(record, step=state.iteration)
    progress.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}",
                         img_s=f"{record['images_per_s']:.1f}", bad=state.bad_images)
    window.restart()


def _stop_requested(state: TrainState, config, stop_request) -> bool:
    """``--max-iters`` reached, or a SIGTERM / SIGINT on any rank: the signal is agreed at every
    step, so that all ranks stop after the same one."""
    max_iters_reached = bool(config.max_iters and state.iteration >= config.max_iters)
    (num_stopping,) = distributed.agree(stop_request is not None and stop_request.requested)
    if num_stopping:
        logger.warning("stopping at iteration %d on %s", state.iteration,
                       stop_request.signal_name or "another rank's signal")
    return max_iters_reached or bool(num_stopping)


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


def _skip_unreadable_batch(state: TrainState, images: list, bad: list, budget: "BadImageBudget") -> bool:
    """Count this step's unreadable images over all ranks; True when the step is skipped, which is
    when any rank has no readable image left in its batch (then every rank skips it)."""
    # One tiny CPU collective per step, whatever the batch holds.
    num_bad, num_empty = distributed.agree(len(bad), 0 if images else 1)
    if num_bad:
        budget.count(state, bad, int(num_bad))
    if num_empty and distributed.is_main_process():
        logger.warning("iteration %d: %d rank(s) have no readable image in their batch; step skipped "
                       "on every rank", state.iteration, int(num_empty))
    return bool(num_empty)


class BadImageBudget:
    """Unreadable training images may be skipped up to ``limit`` (all ranks together); the last
    messages seen by this process are kept for the error that ends the run past it."""

    def __init__(self, limit: int):
        self.limit = limit
        self.recent = []

    def count(self, state: TrainState, bad: list, num_bad: int) -> None:
        """Add this step's skipped images (``num_bad`` over all ranks) to ``state.bad_images``; past
        the limit every rank raises the same :class:`TooManyBadImagesError`."""
        messages = [message for rank_messages in distributed.all_gather_object(bad) for message in rank_messages]
        first = state.bad_images
        state.bad_images += num_bad
        if distributed.is_main_process():
            for number, message in enumerate(messages, start=first + 1):
                logger.warning("skipped unreadable image (%d so far): %s", number, message)
        self.recent = (self.recent + messages)[-5:]
        if state.bad_images > self.limit:
            raise TooManyBadImagesError(
                f"{state.bad_images} unreadable training images skipped, more than --max-bad-images {self.limit}; "
                f"the last ones: {' | '.join(self.recent)}")


@torch.no_grad()
def evaluate(model, data_loader, coco_gt: COCO, label_to_cat_id, device, output_dir=None, amp="none",
             show_progress: bool = True, plot: bool = False, tiling: TileOptions = None) -> dict:
    """Run ``model`` over ``data_loader`` and score the detections with COCOeval (bbox).

    Args:
        model: eval mode maps a list of images (uint8 or float ``[3, H, W]``) to
            ``[{"boxes": FloatTensor[N, 4] x1y1x2y2, "scores": FloatTensor[N], "labels": Int64Tensor[N]}]``,
            boxes in the pixel coordinates of ``coco_gt``'s images. Its train/eval mode is restored on return.
        data_loader: yields ``(list of images, list of targets)`` with ``target["image_id"]``;
            under DDP give it a ``DistributedSampler(shuffle=False)``: repeats are counted once.
        coco_gt: ground truth. Only the images the loader yields are scored, so a subset loader
            does not count the rest of the split as misses.
        label_to_cat_id: label k -> dataset category id (sequence or mapping).
        output_dir: if set, rank 0 writes ``results.json``, ``metrics.json`` (and PNGs with ``plot``).
        amp: ``--amp``: "none", "auto" (fp16 on CUDA, bf16 on CPU), "fp16" or "bf16" (``utils.runtime.device``).
        tiling: sliced inference (``model.tiling.TileOptions``); None = the model's default: a model
            trained on crops (``config["crop_size"] > 0``) runs on windows of its own size and scale,
            any other as it is; ``TileOptions(tile=0)`` never tiles.

    Returns:
        the 12 COCO figures (fraction or None, see ``utils.evaluation.coco_eval``) plus ``"per_category"``.
        Every rank returns the same dict: rank 0 scores and broadcasts it, so all ranks can
        take the same decision (best checkpoint, early stop) without another collective.
    """
    results, image_ids = predict_coco_results(model, data_loader, label_to_cat_id, device, amp, show_progress,
                                              tiling=tiling)
    metrics = None
    if distributed.is_main_process():
        if output_dir is not None:
            write_json_atomic(Path(output_dir) / "results.json", results)
        metrics = report_coco_metrics(coco_gt, results, output_dir, plot=plot, image_ids=image_ids)
    return distributed.broadcast_object(metrics)


@torch.no_grad()
def predict_coco_results(model, data_loader, label_to_cat_id, device, amp="none", show_progress: bool = True,
                         tiling: TileOptions = None):
    """Run ``model`` over ``data_loader`` (see :func:`evaluate`, also for ``tiling``), gathered over DDP ranks.

    Returns ``(results, image_ids)`` on every rank: the COCO results list
    (``[{"image_id", "category_id", "bbox": [x, y, w, h], "score"}]``, by image id) and the
    ids of every image seen, also those without detections.
    """
    device = torch.device(device)
    dtype = autocast_dtype(amp, device)
    was_training = model.training
    model.eval()
    detector = tile_detector(model, tiling, show_progress=show_progress and distributed.is_main_process())
    if isinstance(detector, TiledDetector) and distributed.is_main_process():
        logger.info("sliced evaluation: %s", detector.describe())
    results_by_image = {}  # image_id -> COCO results; an image without detections still counts as evaluated
    progress = tqdm(total=_num_images(data_loader), unit="img", desc="eval",
                    disable=not (show_progress and distributed.is_main_process()))
    start = time.perf_counter()
    for images, targets in data_loader:
        images = [image.to(device, non_blocking=True) for image in images]
        with autocast(device, dtype):
            outputs = detector(images)
        if len(outputs) != len(images):
            raise ValueError(f"model returned {len(outputs)} predictions for {len(images)} images")
        for output, target in zip(outputs, targets):
            # To CPU and to plain Python at once: GPU tensors kept for a whole split would fill the GPU.
            output = {key: output[key].detach().cpu() for key in ("boxes", "scores", "labels")}
            image_id = int(target["image_id"])
            results_by_image[image_id] = predictions_to_coco_results([output], [image_id], label_to_cat_id)
        progress.update(len(images))
    progress.close()
    model.train(was_training)

    # DistributedSampler pads the last ranks with repeats of the first images; keying by
    # image id counts each image once.
    merged = {}
    for part in distributed.all_gather_object(results_by_image):
        for image_id, results in part.items():
            merged.setdefault(image_id, results)
    if distributed.is_main_process():
        elapsed = time.perf_counter() - start
        logger.info("evaluated %d images in %.1f s (%.1f img/s)", len(merged), elapsed, len(merged) / max(elapsed, 1e-9))
    return [result for image_id in sorted(merged) for result in merged[image_id]], list(merged)


def _num_images(data_loader: DataLoader):
    """Images this process will see, for the progress bar; None if the sampler has no length."""
    sampler = getattr(getattr(data_loader, "batch_sampler", None), "sampler", getattr(data_loader, "sampler", None))
    try:
        return len(sampler)
    except TypeError:
        return None


def report_coco_metrics(coco_gt: COCO, results: list, output_dir=None, plot: bool = False, image_ids=None) -> dict:
    """Score ``results``, log the tables, write ``metrics.json`` (and PNGs) into ``output_dir`` if set."""
    category_names = {cat["id"]: cat["name"] for cat in coco_gt.loadCats(coco_gt.getCatIds())}
    metrics, coco_eval = score_coco_results(coco_gt, results, category_names, image_ids=image_ids)
    if not results:
        logger.warning("no detections at all: every figure with ground truth is 0")
    logger.info("COCO bbox evaluation (%d detections)\n%s", len(results),
                format_metrics_table(metrics, per_category_metrics(coco_eval, category_names)))
    if output_dir is not None:
        write_json_atomic(Path(output_dir) / "metrics.json", metrics)
        logger.info("wrote %s", Path(output_dir) / "metrics.json")
        if plot:
            for path in plot_pr_curves(coco_eval, output_dir, category_names):
                logger.info("wrote %s", path)
    return metrics

"""Train RetinaNet on a COCO-format dataset (or, with no --data-path, on the built-in demo).

    python train.py                                   # demo: synthetic shapes, CPU-friendly
    torchrun --nproc_per_node=8 train.py --data-path /data/coco   # the paper's 1x COCO recipe

The command line and the recipes are in recipes.py, the training step and the evaluation
loop in engine.py; this file sets a run up and drives its epochs.
"""
import functools
import logging
import os
import time

import torch

import coco_dataset
from engine import TrainState, evaluate, train_one_epoch
from model import RetinaNet
from model.anchor_coverage import coverage_summary
from model.crop_advice import crop_advice
from model.weights import ArchitectureConflict, configure_from_weights, load_pretrained_for_finetuning, read_weights
from recipes import resolve_config
from train_options import get_args_parser
from utils.data.crops import CropSettings, mean_fill
from utils.data.demo_data import ensure_demo_dataset
from utils.data.loaders import build_eval_loader, build_train_loader
from utils.runtime import distributed as dist_utils
from utils.runtime.checkpoint import (checkpoint_path, find_resumable_checkpoint, load_checkpoint, prune_checkpoints,
                                      save_checkpoint)
from utils.runtime.device import autocast_dtype, resolve_device
from utils.runtime.errors import ConfigError, UserError, exit_on_user_error
from utils.runtime.logger import MetricWriter, setup_logging
from utils.runtime.rng import restore_rng, rng_state, seed_everything
from utils.training.amp_check import check_amp
from utils.training.optim import build_optimizer
from utils.training.preemption import StopRequest
from utils.visual.training_curves import plot_runs, read_log

logger = logging.getLogger("train")


def main(config):
    device = resolve_device(config.device, dist_utils.launched_by_torchrun().local_rank)
    dist = dist_utils.init_distributed_mode(device)
    setup_logging(config.output_dir)
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    logger.info("recipe %s, %d process(es) on %s: %s", config.recipe, dist.world_size, device, config.to_dict())
    if config.demo_data:
        generate_demo_data(config)
    seed_everything(config.seed + dist.rank)

    train_set = build_train_set(config)
    val_set = coco_dataset.build_dataset(config.data_path, config.val_split)
    model = build_model(config, train_set).to(device).optimize_for(device, channels_last=config.channels_last)
    if dist_utils.is_main_process() and not config.eval_only:  # small objects no anchor fits: say so now
        logger.info(coverage_summary(train_set, model.model_config))
        advice = None if model.model_config.crop_size else crop_advice(train_set.box_arrays(), model.model_config,
                                                                        config.batch_size)
        if advice:  # objects under P3's stride at every affordable whole-image size
            logger.warning(advice)
    model, model_without_ddp = parallelize(model, config, device, dist)
    train_loader, val_loader = build_loaders(config, train_set, val_set, device, dist)
    iters_per_epoch = len(train_loader.batch_sampler.batch_sampler)
    optimizer, lr_scheduler = build_optimizer(model_without_ddp, config, iters_per_epoch)
    amp_dtype = autocast_dtype(config.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype is torch.float16)
    state = resume(config, model_without_ddp, optimizer, lr_scheduler, scaler)

    writer = MetricWriter(config.output_dir)
    run_evaluation = functools.partial(evaluate_and_log, model_without_ddp, val_loader, val_set, device, config,
                                       writer)
    if config.eval_only:
        run_evaluation(state)
        return

    save = functools.partial(save_training_checkpoint, model=model_without_ddp, optimizer=optimizer,
                             lr_scheduler=lr_scheduler, scaler=scaler, config=config, world_size=dist.world_size,
                             categories=train_set.categories)
    if amp_dtype is not None and config.amp_check == "on":  # every rank: the check averages over ranks
        check_amp(model_without_ddp, train_loader, device, amp_dtype)
    stop_request = StopRequest().install()
    num_epochs = config.num_epochs(iters_per_epoch)
    logger.info("training %d iterations: %d epoch(s) of %d iterations, %d %s",
                config.total_iters(iters_per_epoch), num_epochs, iters_per_epoch, len(train_set),
                "windows" if config.model.crop_size else "images")
    start_time = time.time()
    while state.epoch < num_epochs:
        train_loader.batch_sampler.set_epoch(state.epoch, state.batch_in_epoch)
        state, finished = train_one_epoch(model, optimizer, lr_scheduler, scaler, train_loader, device, state,
                                          config, writer, save, stop_request,
                                          config.bad_image_limit(len(train_set)), amp_dtype)
        if not finished:  # --max-iters, or SIGTERM / SIGINT: the checkpoint is written, exit cleanly
            logger.info("stopped at iteration %d; continue with --resume auto --output-dir %s", state.iteration,
                        config.output_dir)
            writer.close()
            dist_utils.cleanup()
            return
        if epoch_end_checkpoint(config.checkpoint_every, iters_per_epoch, state.iteration, state.epoch == num_epochs):
            save(state)
        if state.epoch == num_epochs or (config.eval_interval and state.epoch % config.eval_interval == 0):
            run_evaluation(state)
    logger.info("training time %.1f min", (time.time() - start_time) / 60)
    _check_ranks_agree(model_without_ddp)
    if dist_utils.is_main_process():
        save_final_weights(model_without_ddp, config, dist.world_size, train_set.categories, state.iteration)
        _write_curves(config.output_dir)
    writer.close()
    dist_utils.cleanup()


def epoch_end_checkpoint(checkpoint_every: int, iters_per_epoch: int, iteration: int, last_epoch: bool) -> bool:
    """Whether an epoch that just ended writes a checkpoint. Every epoch does, except that with
    ``--checkpoint-every N`` epochs shorter than N (a handful of images under ``--iters``) leave it to
    the every-N one: a step of a 3-image set is cheaper than writing its 100 MB checkpoint."""
    return (last_epoch or not checkpoint_every or iters_per_epoch >= checkpoint_every
            or iteration % checkpoint_every == 0)


def generate_demo_data(config) -> None:
    """The built-in demo dataset, written by rank 0 on first use (the other ranks wait for it)."""
    if dist_utils.is_main_process():
        ensure_demo_dataset(config.data_path, **config.demo_dataset())
    dist_utils.barrier()


def build_train_set(config):
    """The training split: whole images (``CocoDetection``), or with ``--crop-size`` random windows of
    them (``CropDataset``, an epoch counted in windows), augmented as configured."""
    crop = None
    if config.model.crop_size:
        # Padding in the model's mean colour normalises to 0, the value the model pads batches with.
        crop = CropSettings(size=config.model.crop_size, scale=config.model.crop_scale,
                            min_visible=config.min_visible, object_prob=config.crop_object_prob,
                            scale_jitter=config.scale_jitter, fill=mean_fill(config.model.image_mean))
    train_set = coco_dataset.build_dataset(config.data_path, config.train_split, train=True,
                                           hflip_prob=config.hflip_prob, filter_empty=config.filter_empty,
                                           vflip_prob=config.vflip_prob, rot90_prob=config.rot90_prob,
                                           colour_jitter=config.colour_jitter, crop=crop,
                                           crop_cache_bytes=config.crop_cache_mb * 2**20)
    if crop is not None:
        logger.info("crop training: %d windows of %d x %d px an epoch from %d images at scale %g", len(train_set),
                    crop.size, crop.size, train_set.num_images, crop.scale)
    return train_set


def build_model(config, train_set) -> RetinaNet:
    """The configured model for ``train_set``'s classes; with ``--weights``, initialised from them."""
    if not config.weights:
        return RetinaNet.from_config(config.model.replace(num_classes=train_set.num_classes),
                                     config.pretrained_backbone)
    if "pretrained_backbone" in config.given and config.pretrained_backbone:
        raise ConfigError("--pretrained-backbone and --weights exclude each other: the weights hold the backbone")
    source = read_weights(config.weights)
    try:
        model_config = configure_from_weights(source.config, dict(config.weights_overrides), source.name)
    except ArchitectureConflict as exc:
        flag = "--" + exc.field.replace("_", "-")
        raise ConfigError(f"{flag} {exc.given} contradicts --weights {config.weights}, whose architecture has "
                          f"{exc.field} = {exc.weights_value}; leave {flag} out to fine-tune that architecture") from None
    # The crop window and scale describe this run's training, not the weights': a crop-trained
    # checkpoint fine-tuned on whole images must not make inference tile.
    model = RetinaNet.from_config(model_config.replace(num_classes=train_set.num_classes,
                                                       crop_size=config.model.crop_size,
                                                       crop_scale=config.model.crop_scale))
    report = load_pretrained_for_finetuning(model, source, train_set.categories)
    logger.info("fine-tuning from %s: %d tensors loaded, classes kept %s, new classes %s", config.weights,
                len(report["loaded"]), report["copied_classes"], report["new_classes"])
    return model


def parallelize(model: RetinaNet, config, device: torch.device, dist) -> tuple:
    """``(model to train, the same model without the DDP wrapper)``: compiled, with SyncBN and in DDP as configured."""
    if config.compile:
        model.compile_parts()
    if config.sync_bn and dist.distributed:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if not dist.distributed:
        return model, model
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None), model


def build_loaders(config, train_set, val_set, device: torch.device, dist) -> tuple:
    """``(train_loader, val_loader)``: this process's share of the batch and of each split."""
    per_process_batch = max(config.batch_size // dist.world_size, 1)
    pin_memory = device.type == "cuda"
    train_loader = build_train_loader(train_set, per_process_batch, config.workers, config.seed, dist.rank,
                                      dist.world_size, config.aspect_ratio_grouping, pin_memory=pin_memory)
    val_loader = build_eval_loader(val_set, max(per_process_batch, 2), config.workers, dist.rank, dist.world_size,
                                   pin_memory=pin_memory)
    return train_loader, val_loader


def resume(config, model, optimizer, lr_scheduler, scaler) -> TrainState:
    """The state to start from: a fresh one, or the ``--resume`` checkpoint's, its weights, optimizer,
    schedule, scaler and random generators restored."""
    checkpoint = _resume_checkpoint(config)
    if checkpoint is None:
        return TrainState()
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    lr_scheduler.load_state_dict(checkpoint["lr_scheduler"])
    scaler.load_state_dict(checkpoint["scaler"])
    state = TrainState.from_checkpoint(checkpoint)
    restore_rng(checkpoint.get("rng"))
    logger.info("resumed at epoch %d, batch %d, iteration %d (%d bad images, %d non-finite steps so far)",
                state.epoch, state.batch_in_epoch, state.iteration, state.bad_images, state.non_finite_steps)
    return state


def evaluate_and_log(model, val_loader, val_set, device, config, writer, state: TrainState) -> None:
    """COCO AP on the validation split, into log.jsonl and the log (rank 0); ``model`` is left in train mode."""
    metrics = evaluate(model, val_loader, val_set.coco, [c["id"] for c in val_set.categories], device,
                       output_dir=os.path.join(config.output_dir, f"eval_{config.val_split}"), amp=config.amp)
    if metrics is not None and dist_utils.is_main_process():
        writer.write({"type": "eval", "epoch": state.epoch, "iteration": state.iteration,
                      **{k: v for k, v in metrics.items() if k != "per_category"}}, step=state.iteration)
        logger.info("epoch %d  AP %s  AP50 %s  AP75 %s", state.epoch, *(
            f"{metrics[k]:.4f}" if metrics[k] is not None else "n/a" for k in ("AP", "AP50", "AP75")))
    model.train()


def save_training_checkpoint(state: TrainState, *, model, optimizer, lr_scheduler, scaler, config, world_size: int,
                             categories: list) -> None:
    """Everything a resume needs, from rank 0; only the newest ``--keep-checkpoints`` stay on disk."""
    if not dist_utils.is_main_process():
        return
    save_checkpoint({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "lr_scheduler": lr_scheduler.state_dict(), "scaler": scaler.state_dict(),
                     **state.to_dict(), "args": {**config.to_dict(), "world_size": world_size},
                     "model_config": model.config, "categories": categories, "rng": rng_state()},
                    checkpoint_path(config.output_dir, state.epoch, state.iteration))
    prune_checkpoints(config.output_dir, config.keep_checkpoints)


def save_final_weights(model, config, world_size: int, categories: list, iteration: int) -> None:
    """``model_final.pth`` (weights, architecture, categories, options) and the commands that use it."""
    final = os.path.join(config.output_dir, "model_final.pth")
    save_checkpoint({"model": model.state_dict(), "model_config": model.config, "categories": categories,
                     "args": {**config.to_dict(), "world_size": world_size}, "iteration": iteration}, final)
    logger.info("final weights: %s\n  evaluate:  python evaluation.py --checkpoint %s\n"
                "  inference: python inference.py --checkpoint %s --input %s --output-dir %s",
                final, final, final, os.path.join(config.data_path, config.val_split),
                os.path.join(config.output_dir, "detections"))


def _check_ranks_agree(model) -> None:
    """Under DDP every rank must end with the same parameters; a silent desync would waste the run.

    BatchNorm running statistics are left out: without SyncBN each rank's last
    forward updates them locally (rank 0's are the ones saved).
    """
    if not dist_utils.is_dist_avail_and_initialized():
        return
    checksum = float(sum(p.detach().double().sum() for p in model.parameters()))
    checksums = dist_utils.all_gather_object(checksum)
    if max(checksums) - min(checksums) > 1e-6 * max(1.0, abs(checksum)):
        raise RuntimeError(f"DDP ranks ended with different weights: checksums {checksums}")
    logger.info("all %d ranks agree on the final weights (checksum %.6f)", len(checksums), checksum)


def _write_curves(output_dir: str) -> None:
    """``curves.png`` from the run's log.jsonl (tools/plot_logs.py overlays several runs); never fails the run."""
    try:
        path = plot_runs([read_log(output_dir)], os.path.join(output_dir, "curves.png"))
    except ImportError:
        logger.info("no curves.png: matplotlib is not installed (pip install matplotlib, then tools/plot_logs.py %s)",
                    output_dir)
        return
    except UserError as exc:  # an empty or unreadable log: nothing to draw
        logger.warning("no curves.png: %s", exc)
        return
    logger.info("training curves: %s", path)


def _resume_checkpoint(config):
    resume = config.resume
    # torchrun --max-restarts relaunches the same command after a failure: pick up
    # from the newest checkpoint instead of starting over.
    if not resume and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        resume = "auto"
    if not resume:
        return None
    if resume == "auto":
        path, checkpoint = find_resumable_checkpoint(config.output_dir)
        logger.info("--resume auto: %s", path or f"no checkpoint in {config.output_dir}, starting fresh")
        return checkpoint
    return load_checkpoint(resume)


if __name__ == "__main__":
    exit_on_user_error(lambda: main(resolve_config(get_args_parser().parse_args())))

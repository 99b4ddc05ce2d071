"""Train RetinaNet on a COCO-format dataset (or, with no --data-path, on the built-in demo).

    python train.py                                   # demo: synthetic shapes, CPU-friendly
    torchrun --nproc_per_node=8 train.py --data-path /data/coco   # the paper's 1x COCO recipe
"""
import argparse
import logging
import os
import time

import torch

import coco_dataset
from engine import TrainState, evaluate, train_one_epoch
from model import BACKBONES, RetinaNet
from model.anchor_coverage import coverage_summary
from model.config import CLS_LOSSES
from model.weights import ArchitectureConflict, configure_from_weights, load_pretrained_for_finetuning, read_weights
from recipes import DEMO_DATASET, RECIPES, option_help, resolve_config
from utils.runtime import distributed as dist_utils
from utils.runtime.checkpoint import (checkpoint_path, find_resumable_checkpoint, load_checkpoint, prune_checkpoints,
                              save_checkpoint)
from utils.training.amp_check import check_amp
from utils.data.demo_data import ensure_demo_dataset
from utils.runtime.device import AMP_CHOICES, autocast_dtype, resolve_device
from utils.runtime.errors import ConfigError, UserError, exit_on_user_error
from utils.data.loaders import build_eval_loader, build_train_loader
from utils.runtime.logger import MetricWriter, setup_logging
from utils.training.lr_schedule import WarmupSchedule
from utils.visual.training_curves import plot_runs, read_log
from utils.training.preemption import StopRequest
from utils.runtime.rng import restore_rng, rng_state, seed_everything

logger = logging.getLogger("train")


def get_args_parser():
    """Every option defaults to None (= not given): the recipe and the defaults fill it in (recipes.py)."""
    p = argparse.ArgumentParser("RetinaNet training", description="Options not given take the recipe's value "
                                "(--recipe coco|demo, see recipes.py), else the default shown.")
    h = option_help
    data = p.add_argument_group("data")
    data.add_argument("--recipe", choices=sorted(RECIPES), help="coco: the paper's 1x schedule (default with "
                      "--data-path); demo: from scratch, CPU-friendly (default without)")
    data.add_argument("--data-path", help="COCO-format ROOT (annotations/instances_SPLIT.json + SPLIT/ images); "
                      "omit to generate and train on the built-in demo dataset")
    data.add_argument("--train-split", help=h("train_split", "training split name"))
    data.add_argument("--val-split", help=h("val_split", "validation split name"))
    data.add_argument("--filter-empty", action="store_true", default=None, help="drop training images without boxes")
    data.add_argument("--no-aspect-ratio-grouping", dest="aspect_ratio_grouping", action="store_false", default=None,
                      help="mix wide and tall images in a batch")
    data.add_argument("--hflip-prob", type=float, help=h("hflip_prob", "horizontal flip probability"))
    data.add_argument("--workers", type=int, help=h("workers", "data loading processes per GPU"))
    data.add_argument("--max-bad-images", type=float, help="stop when more unreadable images than this were "
                      "skipped: a fraction of the dataset if < 1, else a count (default: 0.1 %%, at least 10)")
    mdl = p.add_argument_group("model")
    mdl.add_argument("--weights", help="fine-tune from detection weights: one of our checkpoints, a torchvision "
                     "RetinaNet state-dict file or weights name (RetinaNet_ResNet50_FPN_V2_Weights.COCO_V1); the "
                     "architecture follows the weights (an architecture flag that contradicts them is an error), "
                     "every tensor but the last classifier layer is loaded, classifier rows of categories whose "
                     "names match are kept")
    mdl.add_argument("--backbone", choices=sorted(BACKBONES), help=h("backbone", "trunk"))
    mdl.add_argument("--pretrained-backbone", help=h("pretrained_backbone", "ImageNet weights: torchvision tag "
                     "(DEFAULT, IMAGENET1K_V1), a .pth path, or 'none'"))
    mdl.add_argument("--trainable-backbone-layers", type=int,
                     help=h("trainable_backbone_layers", "stages trained with frozen BN (0-5)"))
    mdl.add_argument("--fpn-channels", type=int, help=h("fpn_channels", "FPN and head width"))
    mdl.add_argument("--num-extra-levels", type=int, help=h("num_extra_levels", "2 = P6+P7, 0 = P3-P5"))
    mdl.add_argument("--anchor-base-sizes", type=int, nargs="+", help=h("anchor_base_sizes", "anchor size per level"))
    mdl.add_argument("--p6-from", choices=["c5", "p5"], help=h("p6_from", "P6 input"))
    mdl.add_argument("--head-convs", type=int, help=h("head_convs", "convs per head tower"))
    mdl.add_argument("--head-norm", choices=["none", "gn"], help=h("head_norm", "head tower normalisation"))
    mdl.add_argument("--min-size", type=int, nargs="+",
                     help=h("min_size", "shorter side; several values = multi-scale training"))
    mdl.add_argument("--max-size", type=int, help=h("max_size", "longer side cap"))
    mdl.add_argument("--box-loss", choices=["smooth_l1", "l1", "giou"], help=h("box_loss", "box loss"))
    # The paper's Table 1 knobs (README "Reproducing the paper"; tools/ablate.py runs the grids).
    mdl.add_argument("--cls-loss", dest="cls_loss", choices=list(CLS_LOSSES),
                     help=h("cls_loss", "classification loss: focal (eq. 5); ce: sigmoid cross-entropy, no alpha; "
                            "balanced-ce: alpha-balanced CE (eq. 3, --focal-alpha); ohem: CE over the hardest "
                            "anchors per image (--ohem-*)"))
    mdl.add_argument("--focal-gamma", dest="focal_gamma", type=float, help=h("focal_gamma", "focusing parameter"))
    mdl.add_argument("--focal-alpha", dest="focal_alpha", type=float,
                     help=h("focal_alpha", "weight of the foreground terms (focal, balanced-ce); negative = none"))
    mdl.add_argument("--prior-prob", dest="prior_prob", type=float,
                     help=h("prior_prob", "initial foreground probability pi of the classifier (0 = bias 0, "
                            "no prior; with CE the paper reports divergence)"))
    mdl.add_argument("--scales-per-octave", dest="scales_per_octave", type=int,
                     help=h("scales_per_octave", "anchor scales per level: 2^(k/n), k = 0..n-1"))
    mdl.add_argument("--aspect-ratios", dest="aspect_ratios", type=float, nargs="+",
                     help=h("aspect_ratios", "anchor aspect ratios (height / width)"))
    mdl.add_argument("--fg-iou-thresh", dest="fg_iou_thresh", type=float,
                     help=h("fg_iou_thresh", "anchor IoU at or above which it is foreground"))
    mdl.add_argument("--bg-iou-thresh", dest="bg_iou_thresh", type=float,
                     help=h("bg_iou_thresh", "anchor IoU below which it is background (in between: ignored)"))
    mdl.add_argument("--smooth-l1-beta", dest="smooth_l1_beta", type=float,
                     help=h("smooth_l1_beta", "smooth L1 transition point (0 = L1)"))
    mdl.add_argument("--ohem-batch", dest="ohem_batch", type=int,
                     help=h("ohem_batch", "--cls-loss ohem: anchors kept per image"))
    mdl.add_argument("--ohem-nms-thresh", dest="ohem_nms_thresh", type=float,
                     help=h("ohem_nms_thresh", "--cls-loss ohem: NMS IoU over the anchors' boxes (1 = no NMS)"))
    mdl.add_argument("--ohem-fg-ratio", dest="ohem_fg_ratio", type=float,
                     help="--cls-loss ohem: at most this share of the kept anchors is foreground, e.g. 0.25 for "
                          "the paper's 1:3 (default: no cap)")
    mdl.add_argument("--sync-bn", action="store_true", default=None,
                     help="SyncBatchNorm for a trainable-BN backbone under DDP")
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--batch-size", type=int, help=h("batch_size", "total batch over all GPUs"))
    opt.add_argument("--optimizer", choices=["sgd", "adamw"], help=h("optimizer", "optimizer"))
    opt.add_argument("--lr", type=float, help=h("lr", "learning rate at --batch-size; SGD: 0.01 x batch/16 "
                     "(linear scaling), AdamW: 1e-4 x batch/16"))
    opt.add_argument("--momentum", type=float, help=h("momentum", "SGD momentum"))
    opt.add_argument("--weight-decay", type=float, help=h("weight_decay", "weight decay"))
    opt.add_argument("--epochs", type=int, help="training epochs (default: from --schedule; 1x: 12, 3x: 36; demo: 4)")
    opt.add_argument("--iters", type=int, help="instead of --epochs, the schedule's length in iterations: warmup, "
                     "decay steps (scaled from the schedule's epochs) and cosine run over N iterations, then the "
                     "final checkpoint and evaluation; results then depend on N alone, not on the dataset size "
                     "(tools/ablate.py). Unlike --max-iters, which only stops a run")
    opt.add_argument("--schedule", choices=["1x", "3x", "steps", "cosine"],
                     help=h("schedule", "1x: 12 ep, x0.1 at 8 and 11; 3x: 36 ep, at 27 and 33; steps: --lr-steps"))
    opt.add_argument("--lr-steps", type=int, nargs="+", help="epochs of x0.1 decay (--schedule steps)")
    opt.add_argument("--warmup-iters", type=int, help=h("warmup_iters", "linear warmup iterations"))
    opt.add_argument("--warmup-factor", type=float, help=h("warmup_factor", "warmup starts at lr x this"))
    opt.add_argument("--clip-grad-norm", type=float, help=h("clip_grad_norm", "max gradient norm (0 = off)"))
    run = p.add_argument_group("runtime")
    run.add_argument("--device", help=h("device", "auto (this rank's GPU if CUDA is there, else cpu), cuda, cpu"))
    run.add_argument("--amp", choices=AMP_CHOICES, help=h("amp", "mixed precision (auto: fp16 on CUDA, bf16 on CPU)"))
    run.add_argument("--amp-check", choices=["on", "off"],
                     help=h("amp_check", "with --amp: compare the first batch's loss under autocast with fp32 and "
                            "warn, naming the difference, past 5 %% (utils/training/amp_check.py)"))
    run.add_argument("--channels-last", action="store_true", default=None, help="channels_last memory format")
    run.add_argument("--compile", action="store_true", default=None,
                     help="torch.compile backbone, FPN, heads and the dense loss (GPU runs at a fixed size; "
                          "the first iterations compile)")
    run.add_argument("--seed", type=int, help=h("seed", "random seed (each rank uses seed + rank)"))
    run.add_argument("--output-dir", help=h("output_dir", "checkpoints and logs"))
    run.add_argument("--resume", help="checkpoint path, or 'auto' for the newest valid one in --output-dir")
    run.add_argument("--eval-interval", type=int, help=h("eval_interval", "evaluate every N epochs (0 = at the end)"))
    run.add_argument("--eval-only", action="store_true", default=None, help="evaluate the resumed weights and exit")
    run.add_argument("--checkpoint-every", type=int,
                     help=h("checkpoint_every", "also checkpoint every N iterations (0 = per epoch)"))
    run.add_argument("--keep-checkpoints", type=int, help=h("keep_checkpoints", "training checkpoints kept on disk"))
    run.add_argument("--max-iters", type=int, help=h("max_iters", "stop after this many iterations (0 = no limit)"))
    run.add_argument("--max-non-finite", type=int,
                     help=h("max_non_finite", "stop after this many non-finite losses in a row (each is skipped)"))
    run.add_argument("--print-freq", type=int, help=h("print_freq", "log every N iterations"))
    run.add_argument("--num-threads", type=int, help=h("num_threads", "CPU threads for torch (0 = torch default)"))
    return p


def main(config):
    device = resolve_device(config.device, dist_utils.launched_by_torchrun().local_rank)
    dist = dist_utils.init_distributed_mode(device)
    setup_logging(config.output_dir)
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    logger.info("recipe %s, %d process(es) on %s: %s", config.recipe, dist.world_size, device, config.to_dict())
    if config.demo_data:
        if dist_utils.is_main_process():
            ensure_demo_dataset(config.data_path, **DEMO_DATASET)
        dist_utils.barrier()
    seed_everything(config.seed + dist.rank)

    train_set = coco_dataset.build_dataset(config.data_path, config.train_split, train=True,
                                           hflip_prob=config.hflip_prob, filter_empty=config.filter_empty)
    val_set = coco_dataset.build_dataset(config.data_path, config.val_split)
    model = build_model(config, train_set).to(device).optimize_for(device, channels_last=config.channels_last)
    if dist_utils.is_main_process() and not config.eval_only:  # small objects no anchor fits: say so now
        logger.info(coverage_summary(train_set, model.model_config))
    if config.compile:
        model.compile_parts()
    if config.sync_bn and dist.distributed:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model_without_ddp = model
    if dist.distributed:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                          else None)

    per_process_batch = max(config.batch_size // dist.world_size, 1)
    pin_memory = device.type == "cuda"
    train_loader = build_train_loader(train_set, per_process_batch, config.workers, config.seed, dist.rank,
                                      dist.world_size, config.aspect_ratio_grouping, pin_memory=pin_memory)
    val_loader = build_eval_loader(val_set, max(per_process_batch, 2), config.workers, dist.rank, dist.world_size,
                                   pin_memory=pin_memory)
    iters_per_epoch = len(train_loader.batch_sampler.batch_sampler)
    optimizer, lr_scheduler = build_optimizer(model_without_ddp, config, iters_per_epoch)
    amp_dtype = autocast_dtype(config.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype is torch.float16)

    state = TrainState()
    checkpoint = _resume_checkpoint(config)
    if checkpoint is not None:
        model_without_ddp.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        lr_scheduler.load_state_dict(checkpoint["lr_scheduler"])
        scaler.load_state_dict(checkpoint["scaler"])
        state = TrainState.from_checkpoint(checkpoint)
        restore_rng(checkpoint.get("rng"))
        logger.info("resumed at epoch %d, batch %d, iteration %d (%d bad images, %d non-finite steps so far)",
                    state.epoch, state.batch_in_epoch, state.iteration, state.bad_images, state.non_finite_steps)

    writer = MetricWriter(config.output_dir)

    def run_evaluation(epoch: int):
        metrics = evaluate(model_without_ddp, val_loader, val_set.coco, [c["id"] for c in val_set.categories],
                           device, output_dir=os.path.join(config.output_dir, f"eval_{config.val_split}"),
                           amp=config.amp)
        if metrics is not None and dist_utils.is_main_process():
            writer.write({"type": "eval", "epoch": epoch, "iteration": state.iteration,
                          **{k: v for k, v in metrics.items() if k != "per_category"}}, step=state.iteration)
            logger.info("epoch %d  AP %s  AP50 %s  AP75 %s", epoch, *(f"{metrics[k]:.4f}" if metrics[k] is not None
                                                                      else "n/a" for k in ("AP", "AP50", "AP75")))
        model_without_ddp.train()

    if config.eval_only:
        run_evaluation(state.epoch)
        return

    def save(current: TrainState):
        if dist_utils.is_main_process():
            save_checkpoint({"model": model_without_ddp.state_dict(), "optimizer": optimizer.state_dict(),
                             "lr_scheduler": lr_scheduler.state_dict(), "scaler": scaler.state_dict(),
                             **current.to_dict(), "args": {**config.to_dict(), "world_size": dist.world_size},
                             "model_config": model_without_ddp.config, "categories": train_set.categories,
                             "rng": rng_state()},
                            checkpoint_path(config.output_dir, current.epoch, current.iteration))
            prune_checkpoints(config.output_dir, config.keep_checkpoints)

    if amp_dtype is not None and config.amp_check == "on":  # every rank: the check averages over ranks
        check_amp(model_without_ddp, train_loader, device, amp_dtype)
    stop_request = StopRequest().install()
    num_epochs = config.num_epochs(iters_per_epoch)
    logger.info("training %d iterations: %d epoch(s) of %d iterations, %d images",
                config.total_iters(iters_per_epoch), num_epochs, iters_per_epoch, len(train_set))
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
        save(state)
        if state.epoch == num_epochs or (config.eval_interval and state.epoch % config.eval_interval == 0):
            run_evaluation(state.epoch)
    logger.info("training time %.1f min", (time.time() - start_time) / 60)
    _check_ranks_agree(model_without_ddp)
    if dist_utils.is_main_process():
        final = os.path.join(config.output_dir, "model_final.pth")
        save_checkpoint({"model": model_without_ddp.state_dict(), "model_config": model_without_ddp.config,
                         "categories": train_set.categories, "args": {**config.to_dict(),
                                                                      "world_size": dist.world_size},
                         "iteration": state.iteration}, final)
        logger.info("final weights: %s\n  evaluate:  python evaluation.py --checkpoint %s\n"
                    "  inference: python inference.py --checkpoint %s --input %s --output-dir %s",
                    final, final, final, os.path.join(config.data_path, config.val_split),
                    os.path.join(config.output_dir, "detections"))
        _write_curves(config.output_dir)
    writer.close()
    dist_utils.cleanup()


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
    model = RetinaNet.from_config(model_config.replace(num_classes=train_set.num_classes))
    report = load_pretrained_for_finetuning(model, source, train_set.categories)
    logger.info("fine-tuning from %s: %d tensors loaded, classes kept %s, new classes %s", config.weights,
                len(report["loaded"]), report["copied_classes"], report["new_classes"])
    return model


def build_optimizer(model, config, iters_per_epoch: int):
    params = [p for p in model.parameters() if p.requires_grad]
    # On CUDA the fused kernels: one launch for all parameters, and the fp16 GradScaler hands them its
    # inf check as a tensor instead of reading it back each step (no host sync).
    fused = {"fused": True} if params and all(p.is_cuda for p in params) else {}
    if config.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay,
                                    **fused)
    else:
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, **fused)
    total = config.total_iters(iters_per_epoch)
    # lr_steps are epochs of the schedule; with --iters they keep their place in it (1x: at 8/12 and 11/12).
    schedule = WarmupSchedule(total, [round(s * total / config.epochs) for s in config.lr_steps],
                              "cosine" if config.schedule == "cosine" else "step",
                              warmup_iters=min(config.warmup_iters, total), warmup_factor=config.warmup_factor)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


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

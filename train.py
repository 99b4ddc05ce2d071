"""Train RetinaNet on a COCO-format dataset (or, with no --data-path, on the built-in demo).

    python train.py                                   # demo: synthetic shapes, CPU-friendly
    torchrun --nproc_per_node=8 train.py --data-path /data/coco   # the paper's 1x COCO recipe
"""
import argparse
import logging
import os
import random
import time

import numpy as np
import torch

import coco_dataset
from engine import train_one_epoch
from model import BACKBONES, build_retinanet
from presets import apply_preset
from utils import distributed as dist_utils
from utils.checkpoint import (checkpoint_path, find_resumable_checkpoint, load_checkpoint, prune_checkpoints,
                              save_checkpoint)
from utils.loaders import build_eval_loader, build_train_loader
from utils.logger import MetricWriter, setup_logging
from utils.preemption import StopRequest
from utils.lr_schedule import WarmupSchedule

logger = logging.getLogger("retinanet")


def get_args_parser():
    p = argparse.ArgumentParser("RetinaNet training", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description="Options left at None take the COCO preset with --data-path, "
                                            "the demo preset without (see presets.py).")
    data = p.add_argument_group("data")
    data.add_argument("--data-path", default=None, help="COCO-format ROOT (annotations/instances_SPLIT.json + "
                      "SPLIT/ images); omit to generate and train on the built-in demo dataset")
    data.add_argument("--train-split", default=None, help="training split name (COCO: train2017)")
    data.add_argument("--val-split", default=None, help="validation split name (COCO: val2017)")
    data.add_argument("--filter-empty", action="store_true", help="drop training images without boxes")
    data.add_argument("--no-aspect-ratio-grouping", dest="aspect_ratio_grouping", action="store_false",
                      help="mix wide and tall images in a batch")
    data.add_argument("--hflip-prob", type=float, default=0.5, help="horizontal flip probability")
    data.add_argument("--workers", type=int, default=None, help="data loading processes per GPU")
    data.add_argument("--max-bad-images", type=float, default=0.001,
                      help="stop when more unreadable images than this were skipped (fraction if < 1, else a count)")
    mdl = p.add_argument_group("model")
    mdl.add_argument("--weights", default=None,
                     help="fine-tune from detection weights: one of our checkpoints, a torchvision RetinaNet "
                          "state-dict file or weights name (RetinaNet_ResNet50_FPN_V2_Weights.COCO_V1); the "
                          "architecture follows the weights, every tensor but the last classifier layer is loaded, "
                          "and classifier rows of categories whose names match are kept")
    mdl.add_argument("--backbone", default=None, choices=sorted(BACKBONES), help="trunk (COCO: resnet50)")
    mdl.add_argument("--pretrained-backbone", default=None,
                     help="ImageNet weights: torchvision tag (DEFAULT, IMAGENET1K_V1), a .pth path, or 'none'")
    mdl.add_argument("--trainable-backbone-layers", type=int, default=3, help="stages trained with frozen BN (0-5)")
    mdl.add_argument("--fpn-channels", type=int, default=None, help="FPN and head width (COCO: 256)")
    mdl.add_argument("--num-extra-levels", type=int, default=None, help="2 = P6+P7 (COCO), 0 = P3-P5")
    mdl.add_argument("--anchor-base-sizes", type=int, nargs="+", default=None, help="anchor size per level")
    mdl.add_argument("--p6-from", default="c5", choices=["c5", "p5"], help="P6 input")
    mdl.add_argument("--head-convs", type=int, default=None, help="convs per head tower (COCO: 4)")
    mdl.add_argument("--head-norm", default=None, choices=["none", "gn"], help="head tower normalisation")
    mdl.add_argument("--min-size", type=int, nargs="+", default=None,
                     help="shorter side; several values = multi-scale training (COCO: 800)")
    mdl.add_argument("--max-size", type=int, default=None, help="longer side cap (COCO: 1333)")
    mdl.add_argument("--box-loss", default="smooth_l1", choices=["smooth_l1", "l1", "giou"], help="box loss")
    mdl.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm for a trainable-BN backbone under DDP")
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--batch-size", type=int, default=None, help="total batch over all GPUs (COCO: 16)")
    opt.add_argument("--optimizer", default=None, choices=["sgd", "adamw"], help="optimizer (COCO: sgd)")
    opt.add_argument("--lr", type=float, default=None,
                     help="learning rate at --batch-size; SGD default 0.01 x batch/16 (linear scaling)")
    opt.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    opt.add_argument("--weight-decay", type=float, default=None, help="weight decay (COCO: 1e-4)")
    opt.add_argument("--epochs", type=int, default=None, help="training epochs (COCO 1x: 12)")
    opt.add_argument("--schedule", default=None, choices=["1x", "3x", "steps", "cosine"],
                     help="1x: 12 ep, x0.1 at 8 and 11; 3x: 36 ep, at 27 and 33; steps: --lr-steps; cosine")
    opt.add_argument("--lr-steps", type=int, nargs="+", default=None, help="epochs of x0.1 decay ('steps')")
    opt.add_argument("--warmup-iters", type=int, default=None, help="linear warmup iterations (COCO: 1000)")
    opt.add_argument("--warmup-factor", type=float, default=1e-3, help="warmup starts at lr x this")
    opt.add_argument("--clip-grad-norm", type=float, default=0.0, help="max gradient norm (0 = off)")
    run = p.add_argument_group("runtime")
    run.add_argument("--device", default="auto", help="auto (cuda if present, else cpu), cuda, cpu")
    run.add_argument("--amp", default="none", choices=["none", "fp16", "bf16"], help="mixed precision")
    run.add_argument("--channels-last", action="store_true", help="channels_last memory format")
    run.add_argument("--compile", action="store_true",
                     help="torch.compile backbone, FPN, heads and the dense loss (GPU runs at a fixed size; "
                          "the first iterations compile)")
    run.add_argument("--seed", type=int, default=42, help="random seed (each rank uses seed + rank)")
    run.add_argument("--output-dir", default=None, help="checkpoints and logs (default: output/demo or output/coco)")
    run.add_argument("--resume", default=None, help="checkpoint path, or 'auto' for the newest valid one in --output-dir")
    run.add_argument("--eval-interval", type=int, default=None, help="evaluate every N epochs (0 = only at the end)")
    run.add_argument("--eval-only", action="store_true", help="evaluate the resumed weights and exit")
    run.add_argument("--checkpoint-every", type=int, default=0, help="also checkpoint every N iterations (0 = per epoch)")
    run.add_argument("--keep-checkpoints", type=int, default=2, help="training checkpoints kept on disk")
    run.add_argument("--max-iters", type=int, default=0, help="stop after this many iterations (0 = no limit; smoke tests)")
    run.add_argument("--max-non-finite", type=int, default=5,
                     help="stop after this many non-finite losses in a row (each one's step is skipped)")
    run.add_argument("--print-freq", type=int, default=20, help="log every N iterations")
    run.add_argument("--num-threads", type=int, default=0, help="CPU threads for torch (0 = torch default)")
    return p


def main(args):
    dist_utils.init_distributed_mode(_resolve_device(args))
    apply_preset(args)
    os.makedirs(args.output_dir, exist_ok=True)
    setup_logging(args.output_dir)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    logger.info("%s", {k: v for k, v in vars(args).items()})
    seed = args.seed + args.rank
    random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)
    device = torch.device(args.device)

    train_set = coco_dataset.build_dataset(args.train_split, args, train=True)
    val_set = coco_dataset.build_dataset(args.val_split, args, train=False)
    model = _build_model(args, train_set).to(device)
    if args.compile:
        model.compile_parts()
    if args.sync_bn and args.distributed:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model_without_ddp = model
    if args.distributed:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[args.local_rank] if device.type == "cuda" else None)

    per_process_batch = max(args.batch_size // args.world_size, 1)
    train_loader = build_train_loader(train_set, per_process_batch, args.workers, args.seed, args.rank,
                                      args.world_size, args.aspect_ratio_grouping, pin_memory=device.type == "cuda")
    val_loader = build_eval_loader(val_set, max(per_process_batch, 2), args.workers, args.rank, args.world_size,
                                   pin_memory=device.type == "cuda")
    iters_per_epoch = len(train_loader.batch_sampler.batch_sampler)
    args.num_train_images = len(train_set)
    optimizer, lr_scheduler = _build_optimizer(model_without_ddp, args, iters_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")

    start_epoch, start_batch, iteration = 0, 0, 0
    checkpoint = _resume_checkpoint(args)
    if checkpoint is not None:
        model_without_ddp.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        lr_scheduler.load_state_dict(checkpoint["lr_scheduler"])
        scaler.load_state_dict(checkpoint["scaler"])
        start_epoch, start_batch = checkpoint["epoch"], checkpoint.get("batch_in_epoch", 0)
        iteration = checkpoint["iteration"]
        _restore_rng(checkpoint.get("rng"))
        logger.info("resumed at epoch %d, batch %d, iteration %d", start_epoch, start_batch, iteration)

    categories = train_set.categories
    writer = MetricWriter(args.output_dir)
    if args.eval_only:
        _evaluate(model_without_ddp, val_loader, val_set, device, args, writer, start_epoch, iteration)
        return

    def save(epoch, batch_in_epoch, iteration):
        state = {"model": model_without_ddp.state_dict(), "optimizer": optimizer.state_dict(),
                 "lr_scheduler": lr_scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch,
                 "batch_in_epoch": batch_in_epoch, "iteration": iteration, "args": _plain_args(args),
                 "model_config": model_without_ddp.config, "categories": categories, "rng": _rng_state()}
        if dist_utils.is_main_process():
            save_checkpoint(state, checkpoint_path(args.output_dir, epoch, iteration))
            prune_checkpoints(args.output_dir, args.keep_checkpoints)

    stop_request = StopRequest().install()
    logger.info("training %d epochs of %d iterations, %d images", args.epochs, iters_per_epoch, len(train_set))
    start_time = time.time()
    for epoch in range(start_epoch, args.epochs):
        train_loader.batch_sampler.set_epoch(epoch, start_batch if epoch == start_epoch else 0)
        iteration, finished = train_one_epoch(model, optimizer, lr_scheduler, scaler, train_loader, device, epoch,
                                              iteration, args, writer, save, stop_request)
        if not finished:  # --max-iters, or SIGTERM / SIGINT: the checkpoint is written, exit cleanly
            logger.info("stopped at iteration %d; continue with --resume auto --output-dir %s", iteration,
                        args.output_dir)
            writer.close()
            dist_utils.cleanup()
            return
        save(epoch + 1, 0, iteration)
        last = epoch + 1 == args.epochs
        if last or (args.eval_interval and (epoch + 1) % args.eval_interval == 0):
            _evaluate(model_without_ddp, val_loader, val_set, device, args, writer, epoch + 1, iteration)
    logger.info("training time %.1f min", (time.time() - start_time) / 60)
    _check_ranks_agree(model_without_ddp)
    if dist_utils.is_main_process():
        final = os.path.join(args.output_dir, "model_final.pth")
        save_checkpoint({"model": model_without_ddp.state_dict(), "model_config": model_without_ddp.config,
                         "categories": categories, "args": _plain_args(args), "iteration": iteration}, final)
        logger.info("final weights: %s\n  evaluate:  python evaluation.py --checkpoint %s\n"
                    "  inference: python inference.py --checkpoint %s --input %s --output-dir %s",
                    final, final, final, os.path.join(args.data_path, args.val_split),
                    os.path.join(args.output_dir, "detections"))
    writer.close()
    dist_utils.cleanup()


# Options that describe the network itself: with --weights they come from the weights.
_ARCHITECTURE_KEYS = ("backbone", "backbone_norm", "trainable_backbone_layers", "fpn_channels", "num_extra_levels",
                      "p6_from", "head_convs", "head_norm", "anchor_base_sizes", "scales_per_octave", "aspect_ratios",
                      "size_divisible", "box_loss")


def _build_model(args, train_set):
    if not args.weights:
        return build_retinanet(num_classes=train_set.num_classes, **args.model_kwargs)
    from model.weights import load_pretrained_for_finetuning, read_weights
    source_config = read_weights(args.weights).model_config
    kwargs = {**args.model_kwargs, "pretrained_backbone": None,
              **{k: source_config[k] for k in _ARCHITECTURE_KEYS if k in source_config}}
    model = build_retinanet(num_classes=train_set.num_classes, **kwargs)
    report = load_pretrained_for_finetuning(model, args.weights, train_set.categories)
    logger.info("fine-tuning from %s: %d tensors loaded, classes kept %s, new classes %s", args.weights,
                len(report["loaded"]), report["copied_classes"], report["new_classes"])
    return model


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


def _resolve_device(args):
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def _build_optimizer(model, args, iters_per_epoch: int):
    params = [p for p in model.parameters() if p.requires_grad]
    if args.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    total = args.epochs * iters_per_epoch
    schedule = WarmupSchedule(total, [s * iters_per_epoch for s in args.lr_steps],
                              "cosine" if args.schedule == "cosine" else "step",
                              warmup_iters=min(args.warmup_iters, total), warmup_factor=args.warmup_factor)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def _resume_checkpoint(args):
    # torchrun --max-restarts relaunches the same command after a failure: pick up
    # from the newest checkpoint instead of starting over.
    if not args.resume and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        args.resume = "auto"
    if not args.resume:
        return None
    if args.resume == "auto":
        path, checkpoint = find_resumable_checkpoint(args.output_dir)
        if path is None:
            logger.info("--resume auto: no checkpoint in %s, starting fresh", args.output_dir)
        else:
            logger.info("--resume auto: %s", path)
        return checkpoint
    return load_checkpoint(args.resume)


def _evaluate(model, loader, dataset, device, args, writer, epoch, iteration):
    from evaluation import evaluate
    label_to_cat_id = [c["id"] for c in dataset.categories]
    metrics = evaluate(model, loader, dataset.coco, label_to_cat_id, device,
                       output_dir=os.path.join(args.output_dir, f"eval_{args.val_split}"),
                       amp=args.amp != "none")
    if metrics is not None and dist_utils.is_main_process():
        record = {"type": "eval", "epoch": epoch, "iteration": iteration,
                  **{k: v for k, v in metrics.items() if k != "per_category"}}
        writer.write(record, step=iteration)
        logger.info("epoch %d  AP %s  AP50 %s  AP75 %s", epoch,
                    *(f"{metrics[k]:.4f}" if metrics[k] is not None else "n/a" for k in ("AP", "AP50", "AP75")))
    model.train()
    return metrics


def _plain_args(args) -> dict:
    return {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, list, tuple, type(None)))}


def _rng_state() -> dict:
    version, internal, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": [version, list(internal), gauss],
            "numpy": [keys.tolist(), int(pos), int(has_gauss), float(cached)]}


def _restore_rng(state) -> None:
    if not state:
        return
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state(("MT19937", np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


if __name__ == "__main__":
    main(get_args_parser().parse_args())

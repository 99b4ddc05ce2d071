"""The optimizer and its per-iteration learning-rate schedule, built from a run's options."""
import torch

from utils.training.lr_schedule import WarmupSchedule


def build_optimizer(model: torch.nn.Module, config, iters_per_epoch: int) -> tuple:
    """``(optimizer, lr_scheduler)`` for the trainable parameters of ``model``; step the scheduler once per iteration.

    ``config`` is a ``recipes.TrainConfig``: ``optimizer`` ("sgd" or "adamw"), ``lr``,
    ``momentum``, ``weight_decay``, the schedule (``schedule``, ``epochs``, ``lr_steps``,
    ``warmup_iters``, ``warmup_factor``) and its length ``total_iters(iters_per_epoch)``.
    """
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

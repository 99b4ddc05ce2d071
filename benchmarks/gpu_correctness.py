"""Part 1 of benchmarks/gpu_check.py: the detector on a device gives the CPU's answers.

Each check takes the device and a :class:`Sizes`, and returns a dict with ``passed`` and its
figures. Run on CPU against CPU (``--device cpu``) the checks only exercise the code.

Weights: random, from a seed, made realistic enough to compare (BatchNorm statistics
measured on the images, classifier and box layers scaled so that scores spread over (0, 1)
instead of sitting at the prior); otherwise thousands of near-equal scores would make the
order of detections, not the arithmetic, decide the comparison.
"""
import copy
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import benchmark  # noqa: E402
import host_sync  # noqa: E402
from model import build_retinanet  # noqa: E402
from ops.fused_focal_loss import focal_loss_from_labels  # noqa: E402
from recipes import TrainConfig  # noqa: E402
from utils.runtime.device import autocast  # noqa: E402
from utils.training.optim import build_optimizer  # noqa: E402


@dataclass(frozen=True)
class Sizes:
    """How big each check runs (``FULL`` on a GPU, ``SMOKE`` for the CPU test)."""
    model: dict                # build_retinanet options of the compared detector
    eval_image_sizes: tuple    # (H, W) of each eval image (different sizes: padding, per-image rescale)
    train_image_size: tuple
    train_batch: int
    amp_model: dict
    amp_image_size: tuple
    amp_batch: int
    amp_steps: int
    focal_shape: tuple         # (B, A, K) logits of the focal loss comparison
    compile_model: dict
    compile_image_size: tuple
    compile_backend: str       # None: inductor ("eager" traces without generating code)


FULL = Sizes(model=dict(backbone="resnet50", num_classes=80, min_size=512, max_size=683),
             eval_image_sizes=((480, 640), (512, 512)), train_image_size=(480, 640), train_batch=2,
             amp_model=dict(backbone="resnet50", num_classes=80, min_size=384, max_size=512),
             amp_image_size=(384, 512), amp_batch=4, amp_steps=30, focal_shape=(4, 120_000, 80),
             compile_model=dict(backbone="resnet18", num_classes=20, fpn_channels=128, head_convs=2,
                                min_size=320, max_size=320),
             compile_image_size=(320, 320), compile_backend=None)
# P3-P6 padded to 64 px: a quarter of the pixels of the default 128 px padding.
_TINY = dict(backbone="resnet18", num_classes=4, fpn_channels=32, head_convs=1, min_size=64, max_size=64,
             num_extra_levels=1, anchor_base_sizes=(16, 32, 64, 128), size_divisible=64)
SMOKE = Sizes(model=_TINY, eval_image_sizes=((64, 80), (64, 64)), train_image_size=(64, 64), train_batch=2,
              amp_model=_TINY, amp_image_size=(64, 64), amp_batch=2, amp_steps=3, focal_shape=(2, 300, 7),
              compile_model=_TINY, compile_image_size=(64, 64), compile_backend="eager")

SCORE_ATOL, BOX_ATOL = 1e-3, 0.5       # detections: the tolerances
LOSS_RTOL, GRAD_COSINE = 1e-3, 0.999   # fp32 training losses and gradients
AMP_FINAL_RTOL = 0.10                  # AMP loss curve: mean of the last 5 steps vs fp32's
FOCAL_RTOL = 1e-4                      # a sum of 38M fp32 terms in two summation orders


def half_dtypes(device: torch.device) -> list:
    """fp16 and bf16 on CUDA (bf16 where the GPU has it); bf16 (and fp16, slowly) on CPU."""
    if device.type != "cuda":
        return [torch.float16, torch.bfloat16]
    return [torch.float16] + ([torch.bfloat16] if torch.cuda.is_bf16_supported() else [])


def images_of(sizes, seed: int) -> list:
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(3, h, w, generator=generator) for h, w in sizes]


_REFERENCE_MODELS = {}


def reference_model(options: dict, seed: int = 0) -> torch.nn.Module:
    """A CPU RetinaNet in eval mode with realistic activations and spread scores (see module doc);
    built once per ``options`` (callers copy it with :func:`on`)."""
    key = (tuple(sorted(options.items())), seed)
    if key not in _REFERENCE_MODELS:
        _REFERENCE_MODELS[key] = _build_reference_model(options, seed)
    return _REFERENCE_MODELS[key]


def _build_reference_model(options: dict, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_retinanet(backbone_norm="bn", trainable_backbone_layers=5, prior_prob=0.01, **options)
    batch, _, _ = model.transform(images_of([(options["min_size"], options["max_size"])] * 2, seed + 1))
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None  # a plain average over the calibration passes
        model.train()
        model.backbone(batch)
        for norm in norms:
            norm.momentum = 0.1
        model.eval()
        cls_logits, box_deltas = model.head(model.fpn(model.backbone(batch)))
        head = model.head
        head.cls_logits.weight.mul_(2.0 / (cls_logits - head.cls_logits.bias.mean()).std())
        head.cls_logits.bias.fill_(-4.0)  # with logit spread 2: a few % of the candidates above 0.05
        head.bbox_pred.weight.mul_(0.2 / (box_deltas - head.bbox_pred.bias.mean()).std())
    return model


def on(model, device, **optimize) -> torch.nn.Module:
    """An independent copy of ``model`` on ``device`` with that device's execution choices."""
    return copy.deepcopy(model).to(device).optimize_for(device, **optimize)


def compare_detections(reference: list, candidate: list, score_atol=SCORE_ATOL, box_atol=BOX_ATOL) -> dict:
    """Match each image's detections one to one (same label, score and box within tolerance).

    A detection left without a partner is excused only at the cut of the list: when its
    score is within ``score_atol`` of the lowest kept score, rounding may legitimately
    decide which of two near-equal detections is the last one kept.
    """
    counts, unmatched, at_cut, score_diff, box_diff = [], 0, 0, 0.0, 0.0
    for ref, cand in zip(reference, candidate):
        ref = {k: v.detach().float().cpu() if k != "labels" else v.cpu() for k, v in ref.items()}
        cand = {k: v.detach().float().cpu() if k != "labels" else v.cpu() for k, v in cand.items()}
        counts.append([len(ref["scores"]), len(cand["scores"])])
        boxes = (ref["boxes"][:, None] - cand["boxes"][None]).abs().amax(-1) if len(cand["scores"]) \
            else torch.zeros(len(ref["scores"]), 0)
        scores = (ref["scores"][:, None] - cand["scores"][None]).abs()
        fits = (ref["labels"][:, None] == cand["labels"][None]) & (scores <= score_atol) & (boxes <= box_atol)
        used = torch.zeros(len(cand["scores"]), dtype=torch.bool)
        for i in range(len(ref["scores"])):
            options = (fits[i] & ~used).nonzero().flatten()
            if len(options):
                j = options[boxes[i, options].argmin()]
                used[j] = True
                score_diff, box_diff = max(score_diff, float(scores[i, j])), max(box_diff, float(boxes[i, j]))
            elif _at_cut(ref["scores"][i], ref, cand, score_atol):
                at_cut += 1
            else:
                unmatched += 1
        for j in (~used).nonzero().flatten().tolist():
            if _at_cut(cand["scores"][j], ref, cand, score_atol):
                at_cut += 1
            else:
                unmatched += 1
    same_counts = all(a == b for a, b in counts)
    return {"passed": same_counts and unmatched == 0 and sum(a for a, _ in counts) > 0,
            "counts": counts, "unmatched": unmatched, "excused_at_cut": at_cut,
            "max_score_diff": score_diff, "max_box_diff_px": box_diff,
            "tolerance": {"score": score_atol, "box_px": box_atol}}


def _at_cut(score, ref, cand, score_atol) -> bool:
    lowest = min([float(d["scores"].min()) for d in (ref, cand) if len(d["scores"])], default=0.0)
    return float(score) <= lowest + score_atol


def _detect(model, images):
    with torch.no_grad():
        return model(images)


def check_eval_detections(device, sizes: Sizes, reference_device="cpu") -> dict:
    model = reference_model(sizes.model)
    images = images_of(sizes.eval_image_sizes, seed=11)
    return compare_detections(_detect(on(model, reference_device), images), _detect(on(model, device), images))


def _train_batch(sizes: Sizes, num_classes: int, seed: int = 5):
    return benchmark.make_batch(sizes.train_batch, sizes.train_image_size, 4, num_classes,
                                torch.Generator().manual_seed(seed))


def _losses_and_grads(model, images, targets) -> tuple:
    model.train()
    losses = model(images, targets)
    sum(losses.values()).backward()
    grads = torch.cat([p.grad.detach().flatten().double().cpu() for p in model.parameters() if p.grad is not None])
    return {k: float(v.detach()) for k, v in losses.items()}, grads


def compare_training(reference_model_, candidate_model, images, targets) -> dict:
    """One batch's losses and gradients of two copies of a model (fp32)."""
    ref_losses, ref_grads = _losses_and_grads(reference_model_, images, targets)
    losses, grads = _losses_and_grads(candidate_model, images, targets)
    relative = {k: abs(losses[k] - ref_losses[k]) / max(abs(ref_losses[k]), 1e-12) for k in ref_losses}
    cosine = float(F.cosine_similarity(ref_grads, grads, dim=0)) if len(grads) == len(ref_grads) else float("nan")
    return {"passed": max(relative.values()) <= LOSS_RTOL and cosine >= GRAD_COSINE,
            "reference": ref_losses, "device": losses, "relative_difference": relative,
            "gradient_cosine": cosine, "tolerance": {"loss_rtol": LOSS_RTOL, "gradient_cosine": GRAD_COSINE}}


def check_train_losses(device, sizes: Sizes, reference_device="cpu") -> dict:
    model = reference_model(sizes.model)
    images, targets = _train_batch(sizes, sizes.model["num_classes"])
    return compare_training(on(model, reference_device), on(model, device), images, targets)


def check_channels_last(device, sizes: Sizes) -> dict:
    """``optimize_for(device, channels_last=True)`` against the default layout, on the device."""
    model = reference_model(sizes.model)
    images = images_of(sizes.eval_image_sizes, seed=11)
    detections = compare_detections(_detect(on(model, device), images),
                                     _detect(on(model, device, channels_last=True), images))
    train_images, targets = _train_batch(sizes, sizes.model["num_classes"])
    training = compare_training(on(model, device), on(model, device, channels_last=True), train_images, targets)
    return {"passed": detections["passed"] and training["passed"], "eval_detections": detections,
            "training": training}


def check_compile(device, sizes: Sizes) -> dict:
    """``compile_parts()`` against eager on the device: detections, and the training losses."""
    model = reference_model(sizes.compile_model)
    images = images_of([sizes.compile_image_size] * 2, seed=13)
    kwargs = {"backend": sizes.compile_backend} if sizes.compile_backend else {}
    eager, compiled = on(model, device), on(model, device).compile_parts(**kwargs)
    detections = compare_detections(_detect(eager, images), _detect(compiled, images))
    train_images, targets = benchmark.make_batch(2, sizes.compile_image_size, 4, sizes.compile_model["num_classes"],
                                                 torch.Generator().manual_seed(5))
    eager.train()
    compiled.train()
    with torch.no_grad():
        expected, got = eager(train_images, targets), compiled(train_images, targets)
    relative = {k: abs(float(got[k]) - float(expected[k])) / max(abs(float(expected[k])), 1e-12) for k in expected}
    return {"passed": detections["passed"] and max(relative.values()) <= LOSS_RTOL,
            "backend": sizes.compile_backend or "inductor", "eval_detections": detections,
            "training_loss_relative_difference": relative}


def check_focal_loss(device, sizes: Sizes) -> dict:
    """ops/fused_focal_loss.py (chunked, gradient in the forward pass) against torchvision's formula."""
    batch, anchors, num_classes = sizes.focal_shape
    generator = torch.Generator().manual_seed(3)
    logits = (torch.randn(batch, anchors, num_classes, generator=generator) * 3).to(device)
    labels = torch.where(torch.rand(batch, anchors, generator=generator) < 0.02,
                         torch.randint(num_classes, (batch, anchors), generator=generator), -1).to(device)
    valid = (torch.rand(batch, anchors, generator=generator) > 0.05).to(device)
    results = {}
    # Half-precision logits as autocast's heads produce them (CPU: bf16 only; its fp16 is slow and unused).
    for dtype in [torch.float32] + (half_dtypes(device) if device.type == "cuda" else [torch.bfloat16]):
        inputs = logits.to(dtype).detach().clone().requires_grad_()
        fast = focal_loss_from_labels(inputs, labels, valid)
        fast.backward()
        plain_inputs = logits.to(dtype).float().detach().clone().requires_grad_()  # the same rounded values
        targets = F.one_hot(labels.clamp(min=0), num_classes).float() * (labels >= 0)[..., None]
        plain = (sigmoid_focal_loss(plain_inputs, targets, reduction="none") * valid[..., None]).sum()
        plain.backward()
        fast, plain = float(fast.detach()), float(plain.detach())
        value_error = abs(fast - plain) / abs(plain)
        grad_error = float((inputs.grad.float() - plain_inputs.grad).abs().max() / plain_inputs.grad.abs().max())
        grad_tolerance = 1e-5 if dtype is torch.float32 else 1e-2  # the gradient is returned in the input dtype
        results[str(dtype).replace("torch.", "")] = {
            "passed": value_error <= FOCAL_RTOL and grad_error <= grad_tolerance, "loss": fast,
            "relative_loss_difference": value_error, "relative_max_gradient_difference": grad_error}
        del inputs, plain_inputs, fast, plain, targets
    return {"passed": all(r["passed"] for r in results.values()), "shape": list(sizes.focal_shape), **results}


def _loss_curve(model, batches, device, dtype, steps: int) -> dict:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)
    model.train()
    curve, skipped = [], 0
    for step in range(steps):
        images, targets = batches[step % len(batches)]
        with autocast(device, dtype):
            losses = model(images, targets)
        loss = sum(losses.values())
        curve.append(float(loss))
        optimizer.zero_grad(set_to_none=True)
        scale = scaler.get_scale() if scaler.is_enabled() else None
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        skipped += int(scale is not None and scaler.get_scale() < scale)  # the scaler skipped an overflow
    return {"curve": curve, "scaler_skipped_steps": skipped}


def check_amp_training(device, sizes: Sizes) -> dict:
    """``amp_steps`` SGD steps from one initialisation in fp32, fp16 (GradScaler) and bf16."""
    torch.manual_seed(0)
    init = build_retinanet(backbone_norm="bn", trainable_backbone_layers=5, **sizes.amp_model)
    generator = torch.Generator().manual_seed(7)
    batches = [benchmark.make_batch(sizes.amp_batch, sizes.amp_image_size, 3, sizes.amp_model["num_classes"],
                                    generator) for _ in range(4)]
    fp32 = _loss_curve(on(init, device), batches, device, None, sizes.amp_steps)["curve"]
    results = {"fp32": fp32}
    passed = all(math.isfinite(v) for v in fp32)
    for dtype in half_dtypes(device):
        run = _loss_curve(on(init, device), batches, device, dtype, sizes.amp_steps)
        curve = run["curve"]
        deviation = [abs(a - b) / abs(b) for a, b in zip(curve, fp32)]
        last = min(5, len(curve))
        final = abs(sum(curve[-last:]) - sum(fp32[-last:])) / abs(sum(fp32[-last:]))
        finite = all(math.isfinite(v) for v in curve)
        ok = finite and final <= AMP_FINAL_RTOL
        passed = passed and ok
        results[DTYPE_NAMES[dtype]] = {"passed": ok, "curve": curve, "finite": finite,
                                       "final_relative_difference": final, "max_relative_deviation": max(deviation),
                                       "mean_relative_deviation": sum(deviation) / len(deviation),
                                       "scaler_skipped_steps": run["scaler_skipped_steps"]}
    return {"passed": passed, "steps": sizes.amp_steps, "tolerance": {"final_rtol": AMP_FINAL_RTOL}, **results}


DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16"}


def check_host_sync(device, batches: list, work_dir: str) -> dict:
    """Host reads / synchronisations of real ``engine.train_one_epoch`` steps (benchmarks/host_sync.py),
    in fp32 and with AMP, with training's optimizer (utils/training/optim.py, fused on CUDA)."""
    device = torch.device(device)
    results, passed = {}, True
    amp = torch.float16 if device.type == "cuda" else torch.bfloat16
    for dtype in (None, amp):
        torch.manual_seed(0)
        model = build_retinanet(**_TINY).to(device).optimize_for(device).train()
        config = TrainConfig(epochs=1, print_freq=2, output_dir=work_dir, warmup_iters=0, optimizer="adamw", lr=1e-4)
        optimizer, _ = build_optimizer(model, config, iters_per_epoch=len(batches))
        scaler = torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)
        result = host_sync.count_training_reads(model, batches, device, optimizer, scaler, config, dtype)
        ok = not result["unexpected_sites"] and result["reads"]["non_finite_guard"] == result["steps"]
        if "cuda_sync_debug" in result:
            ok = ok and result["cuda_sync_debug"]["synchronisations"] <= result["cuda_sync_debug"]["allowed"]
        result["passed"] = ok
        passed = passed and ok
        results[DTYPE_NAMES.get(dtype, "fp32")] = result
    return {"passed": passed, "optimizer": type(optimizer).__name__ + (" (fused)" if device.type == "cuda" else ""),
            **results}

"""The fast paths give the plain paths' answers: fused focal loss, folded BatchNorm,
channels_last, per-level post-processing, and the benchmark script runs end to end."""
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import FrozenBatchNorm2d

from losses.focal_loss import sigmoid_focal_loss
from losses.retinanet_loss import RetinaNetLoss
from model import build_retinanet
from model.postprocess import postprocess_detections
import ops.fused_focal_loss as fused_focal_loss_module
from ops.fused_focal_loss import focal_loss_from_labels

SMALL = dict(num_classes=3, backbone="resnet18", fpn_channels=32, head_convs=1, min_size=64, max_size=64)


def plain_focal_sum(logits, labels, valid, alpha, gamma):
    targets = F.one_hot(labels.clamp(min=0), logits.shape[-1]).to(logits.dtype) * (labels >= 0)[..., None]
    return (sigmoid_focal_loss(logits, targets, alpha=alpha, gamma=gamma) * valid[..., None]).sum()


def random_focal_inputs(shape=(2, 300), num_classes=7, dtype=torch.float32):
    logits = torch.randn(*shape, num_classes) * 4
    logits[0, :4, 0] = torch.tensor([60.0, -60.0, 20.0, -20.0])  # softplus / sigmoid saturation
    labels = torch.where(torch.rand(shape) < 0.2, torch.randint(num_classes, shape), -1)
    labels[0, :4] = torch.tensor([0, 0, -1, -1])
    valid = torch.rand(shape) > 0.1
    return logits.to(dtype), labels, valid


@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (0.5, 1.0), (-1.0, 0.0), (0.75, 3.5)])
@pytest.mark.parametrize("chunk_elements", [None, 64])
def test_focal_loss_from_labels_equals_plain_focal_loss(alpha, gamma, chunk_elements, monkeypatch):
    if chunk_elements:  # several CPU chunks and a ragged last one
        monkeypatch.setattr(fused_focal_loss_module, "_CPU_CHUNK_ELEMENTS", chunk_elements)
    logits, labels, valid = random_focal_inputs()
    fast_in, plain_in = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    fast = focal_loss_from_labels(fast_in, labels, valid, alpha=alpha, gamma=gamma)
    plain = plain_focal_sum(plain_in, labels, valid, alpha, gamma)
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=0)
    (fast * 3).backward()
    (plain * 3).backward()
    torch.testing.assert_close(fast_in.grad, plain_in.grad, rtol=1e-5, atol=1e-5 * plain_in.grad.abs().max().item())


def test_focal_loss_from_labels_half_precision_and_no_grad():
    logits, labels, valid = random_focal_inputs(dtype=torch.bfloat16)
    inputs = logits.clone().requires_grad_()
    fast = focal_loss_from_labels(inputs, labels, valid)
    assert fast.dtype == torch.float32
    torch.testing.assert_close(fast, plain_focal_sum(logits.float(), labels, valid, 0.25, 2.0), rtol=1e-5, atol=0)
    fast.backward()
    assert inputs.grad.dtype == torch.bfloat16 and torch.isfinite(inputs.grad.float()).all()
    with torch.no_grad():
        torch.testing.assert_close(focal_loss_from_labels(logits, labels, valid), fast)
    empty = torch.zeros(0, 5, requires_grad=True)
    assert focal_loss_from_labels(empty, torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.bool)) == 0


def _loss_inputs():
    torch.manual_seed(0)
    anchors = torch.rand(500, 2) * 80
    anchors = torch.cat([anchors, anchors + torch.rand(500, 2) * 40 + 8], 1)
    cls_logits = torch.randn(2, 500, 4, requires_grad=True)
    box_deltas = (torch.randn(2, 500, 4) * 0.1).requires_grad_()
    targets = [{"boxes": torch.tensor([[10.0, 10, 50, 60], [40, 30, 90, 100]]), "labels": torch.tensor([1, 3])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}]
    return cls_logits, box_deltas, anchors, targets


def _compiler_available() -> bool:
    return hasattr(torch, "compile") and any(shutil.which(cc) for cc in ("g++", "c++", "clang++"))


@pytest.mark.skipif(not _compiler_available() or sys.platform == "win32", reason="torch.compile needs a C++ compiler")
def test_compiled_loss_equals_eager_loss():
    cls_logits, box_deltas, anchors, targets = _loss_inputs()
    eager = RetinaNetLoss(4)(cls_logits, box_deltas, anchors, targets)
    grads = torch.autograd.grad(sum(eager.values()), (cls_logits, box_deltas))
    compiled = RetinaNetLoss(4).compile_dense()(cls_logits, box_deltas, anchors, targets)
    compiled_grads = torch.autograd.grad(sum(compiled.values()), (cls_logits, box_deltas))
    for key in eager:
        torch.testing.assert_close(compiled[key], eager[key], rtol=1e-5, atol=0)
    for a, b in zip(compiled_grads, grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def _randomise_batchnorm(model):
    """Non-trivial statistics, so folding has something to fold."""
    for module in model.modules():
        if isinstance(module, (torch.nn.BatchNorm2d, FrozenBatchNorm2d)):
            module.running_mean.normal_(0, 0.2)
            module.running_var.uniform_(0.5, 2.0)
            with torch.no_grad():
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.1)


def _detect(model, images):
    with torch.no_grad():
        return model(images)


def _assert_same_detections(dets_a, dets_b):
    for a, b in zip(dets_a, dets_b):
        assert len(a["scores"]) == len(b["scores"]) > 0
        torch.testing.assert_close(a["scores"], b["scores"], rtol=0, atol=1e-4)
        torch.testing.assert_close(a["boxes"], b["boxes"], rtol=0, atol=1e-2)
        assert torch.equal(a["labels"], b["labels"])


@pytest.mark.parametrize("backbone_norm", ["bn", "frozen_bn"])
def test_folded_batchnorm_gives_the_same_detections(backbone_norm):
    model = build_retinanet(prior_prob=0.3, backbone_norm=backbone_norm, **SMALL).optimize_for("cpu")
    _randomise_batchnorm(model)
    model.eval()
    images = [torch.rand(3, 64, 64), torch.rand(3, 48, 64)]
    folded = _detect(model, images)
    assert len(model.backbone.body._folded._cache) == 20  # every conv of the resnet18 trunk
    model.backbone.body.fold_batchnorm = False
    _assert_same_detections(folded, _detect(model, images))
    assert not any("folded" in key for key in model.state_dict())


def test_folded_weights_follow_weight_updates_and_free_on_train():
    model = build_retinanet(prior_prob=0.3, **SMALL).optimize_for("cpu")
    _randomise_batchnorm(model)
    model.eval()
    images = [torch.rand(3, 64, 64)]
    before = _detect(model, images)
    with torch.no_grad():
        model.backbone.body.layer1[0].conv1.weight.mul_(-1.0)  # an in-place update, like an optimizer step
    after = _detect(model, images)
    model.backbone.body.fold_batchnorm = False
    _assert_same_detections(after, _detect(model, images))
    assert not torch.allclose(before[0]["scores"][:5], after[0]["scores"][:5])
    model.train()
    assert not model.backbone.body._folded._cache


@pytest.mark.parametrize("trainable_layers", [3, 5, 0])
def test_folded_frozen_batchnorm_trains_like_unfolded(trainable_layers):
    """Fine-tuning folds FrozenBatchNorm2d into the convs (frozen stages in channels_last on
    CPU): same losses and same gradients as torchvision's conv -> FrozenBatchNorm2d."""
    torch.manual_seed(0)
    model = build_retinanet(backbone_norm="frozen_bn", trainable_backbone_layers=trainable_layers,
                            prior_prob=0.3, **SMALL).optimize_for("cpu").train()
    _randomise_batchnorm(model)
    assert model.backbone.body.num_frozen_stages() == 5 - trainable_layers
    images = [torch.rand(3, 64, 64), torch.rand(3, 48, 64)]
    targets = [{"boxes": torch.tensor([[10.0, 12, 50, 60]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[0.0, 5, 30, 38]]), "labels": torch.tensor([2])}]
    results = []
    for fold in (True, False):
        model.backbone.body.fold_batchnorm = fold
        model.zero_grad(set_to_none=True)
        losses = model(images, targets)
        sum(losses.values()).backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        results.append((losses, grads))
    (folded, folded_grads), (plain, plain_grads) = results
    for key in plain:
        torch.testing.assert_close(folded[key], plain[key], rtol=1e-5, atol=1e-6)
    assert folded_grads.keys() == plain_grads.keys()
    assert any(name.startswith("backbone") for name in plain_grads) == (trainable_layers > 0)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(folded_grads[name], grad, rtol=1e-4, atol=1e-5 * grad.abs().max().item() + 1e-8)
    # Frozen convs are folded once and cached, trainable ones are folded on every call.
    model.backbone.body.fold_batchnorm = True
    model(images, targets)
    cached = model.backbone.body._folded._cache
    assert len(cached) == {3: 5, 5: 0, 0: 20}[trainable_layers]  # resnet18: stem 1 + layer1 4 + ... = 20 convs


def test_trainable_batchnorm_trains_unfolded_and_folds_in_eval():
    torch.manual_seed(0)
    model = build_retinanet(backbone_norm="bn", **SMALL).optimize_for("cpu").train()
    _randomise_batchnorm(model)
    images = [torch.rand(3, 64, 64)]
    targets = [{"boxes": torch.tensor([[10.0, 12, 50, 60]]), "labels": torch.tensor([1])}]
    torch.manual_seed(1)
    losses = model(images, targets)
    model.backbone.body.fold_batchnorm = False
    torch.manual_seed(1)
    assert all(torch.equal(value, model(images, targets)[key]) for key, value in losses.items())
    assert not model.backbone.body._folded._cache
    model.backbone.body.fold_batchnorm = True
    model.eval()
    _detect(model, images)
    assert len(model.backbone.body._folded._cache) == 20
    _detect(model.double(), [images[0].double()])  # .to() / .double() drop the cached float copies
    assert all(entry[1].dtype == torch.float64 for entry in model.backbone.body._folded._cache.values())


def test_channels_last_gives_the_same_outputs():
    torch.manual_seed(0)
    default = build_retinanet(prior_prob=0.3, **SMALL).optimize_for("cpu")
    default.channels_last_cpu_inference = False
    _randomise_batchnorm(default)
    channels_last = build_retinanet(prior_prob=0.3, **SMALL).optimize_for("cpu", channels_last=True)
    channels_last.load_state_dict(default.state_dict())
    images = [torch.rand(3, 64, 64), torch.rand(3, 40, 64)]
    targets = [{"boxes": torch.tensor([[10.0, 12, 50, 60]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[0.0, 5, 30, 38]]), "labels": torch.tensor([2])}]
    default.train()
    channels_last.train()
    expected, got = default(images, targets), channels_last(images, targets)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-5)
    default.eval()
    channels_last.eval()
    _assert_same_detections(_detect(channels_last, images), _detect(default, images))
    default.channels_last_cpu_inference = True  # the eval-mode default: only the batch goes channels_last
    _assert_same_detections(_detect(default, images), _detect(channels_last, images))


def test_per_level_postprocess_equals_concatenated():
    counts = [300, 80, 20]
    anchors = torch.rand(400, 2) * 80
    anchors = torch.cat([anchors, anchors + torch.rand(400, 2) * 30 + 4], 1)
    cls_logits, box_deltas = torch.randn(2, 400, 5) * 2, torch.randn(2, 400, 4) * 0.2
    sizes = [(100, 90), (64, 100)]
    whole = postprocess_detections(cls_logits, box_deltas, anchors, counts, sizes, topk_candidates=50)
    levels = postprocess_detections(list(cls_logits.split(counts, dim=1)), box_deltas, anchors, counts, sizes,
                                    topk_candidates=50)
    for a, b in zip(whole, levels):
        for key in a:
            assert torch.equal(a[key], b[key])


@pytest.mark.slow
def test_benchmark_runs_end_to_end(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import benchmark

    output = tmp_path / "bench.json"
    args = benchmark.get_args_parser().parse_args(
        ["--backbone", "resnet18", "--image-size", "64", "96", "--iters", "1", "--warmup", "0", "--repeats", "1",
         "--batch-size", "2", "--num-classes", "5", "--threads", "2", "--output", str(output)])
    benchmark.main(args)
    report = json.loads(output.read_text())
    for name in ("ours", "torchvision"):
        assert report[name]["train_images_per_s"] > 0 and report[name]["eval_images_per_s"] > 0
    assert report["train_images_per_s_ratio"] > 0 and report["backbone"] == "resnet18"
    assert report["image_size"] == [64, 96] and report["recipe"] == "finetune"


@pytest.mark.slow
def test_data_benchmark_runs_end_to_end(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import data_benchmark
    from utils.data.demo_data import ensure_demo_dataset

    root = ensure_demo_dataset(str(tmp_path / "shapes"), num_train=12, num_val=2, image_size=48,
                               show_progress=False)
    output = tmp_path / "data.json"
    args = data_benchmark.get_args_parser().parse_args(
        ["--data-path", root, "--workers", "0", "1", "--batch-size", "4", "--batches", "5", "--output", str(output)])
    data_benchmark.main(args)
    report = json.loads(output.read_text())
    assert [r["workers"] for r in report["results"]] == [0, 1]
    # 12 images at batch 4 is 3 batches an epoch: the 5 timed batches span a second epoch.
    assert all(r["batches"] == 5 and r["images_per_s"] > 0 for r in report["results"])
    assert report["num_images"] == 12
    with pytest.raises(FileNotFoundError, match="annotations"):
        data_benchmark.main(data_benchmark.get_args_parser().parse_args(["--data-path", str(tmp_path / "none")]))


def test_compile_parts_keeps_the_state_dict_and_the_losses():
    """``--compile``: same parameter names (checkpoints stay interchangeable), same losses.
    The "eager" backend traces with dynamo without generating code, so this stays fast."""
    torch.manual_seed(0)
    model = build_retinanet(prior_prob=0.3, backbone_norm="frozen_bn", **SMALL).train()
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 64)]
    targets = [{"boxes": torch.tensor([[10.0, 12, 50, 60]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[0.0, 5, 30, 38]]), "labels": torch.tensor([2])}]
    keys = list(model.state_dict())
    expected = model(images, targets)
    model.compile_parts(backend="eager")
    assert list(model.state_dict()) == keys
    got = model(images, targets)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6)
    sum(got.values()).backward()
    assert model.head.cls_logits.weight.grad is not None

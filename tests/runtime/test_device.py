"""One meaning of --device and --amp for every entry script (utils/runtime/device.py)."""
import pytest
import torch

from utils.runtime.device import AMP_CHOICES, autocast, autocast_dtype, resolve_device
from utils.runtime.errors import UserError


def test_auto_device_and_missing_cuda():
    assert resolve_device("auto") == torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="--device cuda: no CUDA device"):
            resolve_device("cuda")
    with pytest.raises(UserError, match="--device tpu"):
        resolve_device("tpu")


@pytest.mark.parametrize("amp,device,expected", [
    ("none", "cpu", None), (None, "cuda", None), (False, "cpu", None),
    ("auto", "cpu", torch.bfloat16), ("auto", "cuda", torch.float16), (True, "cuda", torch.float16),
    ("fp16", "cpu", torch.float16), ("bf16", "cuda", torch.bfloat16),
])
def test_amp_means_the_same_everywhere(amp, device, expected):
    assert autocast_dtype(amp, torch.device(device)) is expected


def test_autocast_runs_in_the_chosen_dtype_or_not_at_all():
    assert set(AMP_CHOICES) == {"none", "auto", "fp16", "bf16"}
    weight = torch.randn(4, 4)
    with autocast(torch.device("cpu"), torch.bfloat16):
        assert (torch.randn(2, 4) @ weight).dtype == torch.bfloat16
    with autocast(torch.device("cpu"), None):
        assert (torch.randn(2, 4) @ weight).dtype == torch.float32
    with pytest.raises(UserError, match="--amp fp8"):
        autocast_dtype("fp8", torch.device("cpu"))

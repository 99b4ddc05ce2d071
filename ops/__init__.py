"""Speed kernels, apart from the architecture (as ``torchvision.ops`` and detectron2's ``layers/``).

Each gives the plain computation's answer up to float rounding and is tested against it:

- ``winograd.py``: Winograd F(2x2, 3x3) for wide 3x3 convs on CPU (``tests/model/test_winograd.py``);
- ``batchnorm_folding.py`` + ``fast_trunk.py``: BatchNorm with fixed statistics folded into the
  convs, CPU-friendly memory layouts for the trunk (``tests/model/test_speed_paths.py``);
- ``fused_focal_loss.py``: the focal loss summed from labels, gradient computed in the forward
  pass; the one RetinaNet trains with, checked equal to the paper's formula in
  ``losses/focal_loss.py`` (``tests/model/test_speed_paths.py``).

Nothing here imports ``model/`` or ``losses/``; ``RetinaNet.optimize_for`` decides at run
time which of these a model uses, and none of it is saved in a checkpoint.
"""

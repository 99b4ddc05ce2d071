import os
import random
import sys

import numpy as np
import pytest
import torch
from hypothesis import settings

# Tests import the repository's top-level modules (train, coco_dataset, ...) directly, and the
# helpers beside this file (forked_scripts, onnx_models, gloo_ranks) from any test folder.
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, TESTS_DIR)
sys.path.insert(0, os.path.dirname(TESTS_DIR))
# Two cores: more threads only fight each other.
torch.set_num_threads(min(2, os.cpu_count() or 1))
# Property-based tests draw the same examples on every run (a failure reproduces, CI is stable).
settings.register_profile("seeded", derandomize=True)
settings.load_profile("seeded")


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)

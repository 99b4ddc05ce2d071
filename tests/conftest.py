import os
import random
import shutil
import sys

import numpy as np
import pytest
import torch
from hypothesis import settings

# Tests import the repository's top-level modules (train, coco_dataset, ...) directly, and the
# helpers beside this file (forked_scripts, onnx_models, gloo_ranks, coco_files, ...) from any test folder.
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


# Module-scoped fixtures (trained checkpoints, datasets) write through tmp_path_factory, which
# pytest keeps to the end of the session: about 2 GB over the whole suite. Once a module has
# finished with no failure, the folders created while it ran are removed; a failing module keeps
# them for inspection. Autouse, so it is set up before the module's other fixtures and torn down
# after them.
@pytest.fixture(scope="module", autouse=True)
def _remove_module_folders_when_passed(request, tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    before, failed_before = set(os.listdir(base)), request.session.testsfailed
    yield
    if request.session.testsfailed == failed_before:
        for name in set(os.listdir(base)) - before:
            shutil.rmtree(base / name, ignore_errors=True)

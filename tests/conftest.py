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
# them for inspection.
_module_state = {"name": None, "before": set(), "failed": False}


def _basetemp_entries(config):
    return set(os.listdir(config._tmp_path_factory.getbasetemp()))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    if outcome.get_result().failed:
        _module_state["failed"] = True


@pytest.hookimpl(tryfirst=True)  # before the module's fixtures are set up
def pytest_runtest_setup(item):
    if item.module.__name__ != _module_state["name"]:
        _module_state.update(name=item.module.__name__, before=_basetemp_entries(item.config), failed=False)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    yield  # module fixtures are finalised inside this teardown when the module ends
    if nextitem is not None and nextitem.module is item.module:
        return
    if not _module_state["failed"]:
        base = item.config._tmp_path_factory.getbasetemp()
        for name in _basetemp_entries(item.config) - _module_state["before"]:
            shutil.rmtree(os.path.join(base, name), ignore_errors=True)
    _module_state["name"] = None

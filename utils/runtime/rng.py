"""Random number generator state: seeding, and the snapshot a checkpoint carries for an exact resume."""
import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Python, NumPy and torch (CPU) generator states as plain containers (``weights_only`` loads them)."""
    version, internal, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": [version, list(internal), gauss],
            "numpy": [keys.tolist(), int(pos), int(has_gauss), float(cached)]}


def restore_rng(state: dict) -> None:
    """Inverse of :func:`rng_state`; ``None`` (an old checkpoint) leaves the generators as they are."""
    if not state:
        return
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state(("MT19937", np.array(keys, dtype=np.uint32), pos, has_gauss, cached))

"""WarmupSchedule: linear warmup, then steps or cosine, as per-iteration multipliers."""
import math
import pickle

import pytest
import torch

from utils.training.lr_schedule import WarmupSchedule


def test_warmup_then_steps_hand_computed():
    schedule = WarmupSchedule(100, milestones=[60, 90], warmup_iters=10, warmup_factor=0.001)
    assert schedule(0) == pytest.approx(0.001)
    assert schedule(5) == pytest.approx(0.001 * 0.5 + 0.5)
    assert schedule(10) == 1.0 and schedule(59) == 1.0
    assert schedule(60) == pytest.approx(0.1) and schedule(90) == pytest.approx(0.01)


def test_cosine_reaches_zero_at_the_end_and_is_warmed_up_first():
    schedule = WarmupSchedule(200, policy="cosine", warmup_iters=20, warmup_factor=0.1)
    assert schedule(0) == pytest.approx(0.1)
    assert schedule(100) == pytest.approx(0.5)
    assert schedule(200) == pytest.approx(0.0, abs=1e-12) and schedule(500) == pytest.approx(0.0, abs=1e-12)
    assert schedule(20) == pytest.approx(0.5 * (1 + math.cos(math.pi * 20 / 200)))


def test_lambda_lr_state_round_trips_for_resume():
    params = [torch.nn.Parameter(torch.zeros(()))]
    optimizer = torch.optim.SGD(params, lr=0.5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupSchedule(50, [30], warmup_iters=5))
    for _ in range(12):
        optimizer.step()
        scheduler.step()
    state = pickle.loads(pickle.dumps(scheduler.state_dict()))
    fresh_optimizer = torch.optim.SGD(params, lr=0.5)
    fresh_optimizer.load_state_dict(optimizer.state_dict())
    fresh = torch.optim.lr_scheduler.LambdaLR(fresh_optimizer, WarmupSchedule(50, [30], warmup_iters=5))
    fresh.load_state_dict(state)
    assert fresh.last_epoch == 12 and fresh.get_last_lr() == scheduler.get_last_lr()
    # The resumed schedule goes on where the first left off: the same rates as the uninterrupted one
    # and the schedule's own values (warm from iteration 5, x0.1 from 30), not its restored last rate.
    for iteration in range(13, 40):
        optimizer.step(), scheduler.step()
        fresh_optimizer.step(), fresh.step()
        expected = 0.5 if iteration < 30 else 0.05
        assert fresh_optimizer.param_groups[0]["lr"] == pytest.approx(expected), iteration
        assert fresh.get_last_lr() == scheduler.get_last_lr(), iteration


def test_bad_policy():
    with pytest.raises(ValueError, match="lr policy"):
        WarmupSchedule(10, policy="linear")

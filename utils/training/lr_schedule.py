"""Learning-rate schedules as per-iteration multipliers (for torch's LambdaLR)."""
import math


class WarmupSchedule:
    """Linear warmup from ``warmup_factor`` then step decay or cosine, per iteration.

    Args:
        total_iters: iterations of the whole run.
        milestones: iterations where the rate is multiplied by ``gamma`` ("step" policy).
        policy: "step" or "cosine" (to 0 at ``total_iters``).
        warmup_iters: length of the linear warmup (1000 in the paper's recipe).
        warmup_factor: starting multiplier (1/1000).

    A plain picklable object, so LambdaLR's state dict (and resume) works.
    """

    def __init__(self, total_iters: int, milestones=(), policy: str = "step", gamma: float = 0.1,
                 warmup_iters: int = 1000, warmup_factor: float = 1e-3):
        if policy not in ("step", "cosine"):
            raise ValueError(f"lr policy must be 'step' or 'cosine', got {policy!r}")
        self.total_iters = max(int(total_iters), 1)
        self.milestones = sorted(int(m) for m in milestones)
        self.policy, self.gamma = policy, gamma
        self.warmup_iters, self.warmup_factor = int(warmup_iters), warmup_factor

    def __call__(self, iteration: int) -> float:
        if self.policy == "cosine":
            factor = 0.5 * (1 + math.cos(math.pi * min(iteration, self.total_iters) / self.total_iters))
        else:
            factor = self.gamma ** sum(iteration >= m for m in self.milestones)
        if iteration < self.warmup_iters:
            alpha = iteration / self.warmup_iters
            factor *= self.warmup_factor * (1 - alpha) + alpha
        return factor

"""Graceful stop on SIGTERM / SIGINT: finish the step, checkpoint, exit 0.

Clusters preempt jobs with SIGTERM and a grace period; Ctrl-C sends SIGINT.
The handler only sets a flag: the training loop checks it between steps, so a
checkpoint is never written from inside a half-finished optimizer step.
"""
import logging
import signal

import torch
import torch.distributed as dist

from utils.distributed import is_dist_avail_and_initialized

logger = logging.getLogger(__name__)


class StopRequest:
    def __init__(self):
        self.requested = False
        self.signal_name = None

    def install(self) -> "StopRequest":
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C means: stop now
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        logger.warning("%s received: finishing this step, writing a checkpoint, then exiting", self.signal_name)

    def should_stop(self, iteration: int, sync_every: int = 10) -> bool:
        """True when any rank was asked to stop.

        Under DDP the ranks agree only every ``sync_every`` iterations (one tiny
        all-reduce), so they all leave the loop at the same step and no rank is
        left waiting in a collective.
        """
        if not is_dist_avail_and_initialized():
            return self.requested
        if iteration % sync_every:
            return False
        flag = torch.tensor([1.0 if self.requested else 0.0],
                            device="cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

"""Graceful stop on SIGTERM / SIGINT: finish the step, checkpoint, exit 0.

Clusters preempt jobs with SIGTERM and a grace period; Ctrl-C sends SIGINT.
The handler only sets a flag: the training loop reads it between steps (all ranks
agree on it, ``utils.runtime.distributed.agree``), so a checkpoint is never written from
inside a half-finished optimizer step and every rank stops at the same step.
"""
import logging
import signal

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

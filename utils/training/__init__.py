"""Parts of a training run beside the loop in engine.py: the optimizer (``optim``), the learning-rate
schedule (``lr_schedule``), the AMP self-check (``amp_check``), stop requests on signals (``preemption``)."""

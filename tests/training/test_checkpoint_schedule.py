"""Which epoch ends write a checkpoint (train.epoch_end_checkpoint) next to ``--checkpoint-every``."""
import train


def epoch_end_iterations(checkpoint_every: int, iters_per_epoch: int, epochs: int) -> list:
    """The iterations at which an epoch's end writes a checkpoint over a whole run."""
    return [epoch * iters_per_epoch for epoch in range(1, epochs + 1)
            if train.epoch_end_checkpoint(checkpoint_every, iters_per_epoch, epoch * iters_per_epoch,
                                          epoch == epochs)]


def test_every_epoch_checkpoints_without_checkpoint_every():
    assert epoch_end_iterations(0, 1, 5) == [1, 2, 3, 4, 5]


def test_epochs_shorter_than_checkpoint_every_leave_it_to_the_every_n_checkpoint():
    # 3 images at batch 4: one step an epoch, 120 epochs; only every 40th and the last write one
    assert epoch_end_iterations(40, 1, 120) == [40, 80, 120]
    assert epoch_end_iterations(5, 2, 6) == [10, 12]  # the run's last epoch always writes one


def test_epochs_at_least_checkpoint_every_long_still_checkpoint_at_their_end():
    assert epoch_end_iterations(2, 3, 3) == [3, 6, 9]
    assert epoch_end_iterations(3, 3, 2) == [3, 6]

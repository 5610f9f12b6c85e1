"""``ResumableSampler``: a training order that is a function of ``(seed, epoch)`` and can resume mid-epoch.

A ``DataLoader(shuffle=True, generator=...)`` draws each epoch's order from one generator that advances
from epoch to epoch and is re-seeded whenever the loader is rebuilt: a run resumed from a checkpoint
then replays epoch 0's order and restarts the epoch from its first batch. torch's
``DistributedSampler`` already fixes the order of epoch ``e`` from ``(seed, e)`` alone, so any process
can rebuild it; this subclass adds :meth:`ResumableSampler.resume_at`, which makes the next pass
start after the examples a checkpoint had already consumed.

Lightning calls ``set_epoch`` at the start of every training epoch and leaves a ``DistributedSampler``
in place under data-parallel strategies (it only injects its own sampler into loaders that lack one);
the data module records the position (epoch, batches consumed) in the checkpoint and hands it back
through :meth:`ResumableSampler.resume_at` before the loader is iterated again.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sized
from typing import Any

from torch.utils.data import DistributedSampler

__all__ = ["ResumableSampler", "TrainPositionMixin"]


class ResumableSampler(DistributedSampler):
    """Shuffled indices of ``dataset``, one pass per epoch, the order fixed by ``(seed, epoch)``.

    With ``num_replicas > 1`` each rank gets its own share of every epoch (padded to equal length,
    as ``DistributedSampler`` does); a single process (the default) sees every example once per epoch.

    Args:
        dataset: anything with ``len()``.
        seed: the same ``(seed, epoch)`` gives the same order in every process and every run.
        num_replicas / rank: the data-parallel world size and this process's rank.
    """

    def __init__(self, dataset: Sized, *, seed: int, num_replicas: int = 1, rank: int = 0) -> None:
        if len(dataset) < 1:
            raise ValueError("ResumableSampler needs at least one example")
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self._skip = 0  # examples of `self.epoch` consumed before a resume; applies to the next pass only

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next pass yields (Lightning calls this at every epoch start)."""
        if epoch != self.epoch:
            self._skip = 0  # a position recorded in another epoch does not apply to this one
        super().set_epoch(epoch)

    def resume_at(self, epoch: int, consumed: int) -> None:
        """Make the next pass continue ``epoch`` after this rank's first ``consumed`` examples.

        A position at or past the end of the epoch means the epoch was complete: the next pass is
        the whole of ``epoch + 1``.
        """
        if epoch < 0 or consumed < 0:
            raise ValueError(f"resume position must be non-negative, got epoch={epoch}, consumed={consumed}")
        if consumed >= self.num_samples:
            epoch, consumed = epoch + 1, 0
        self.epoch, self._skip = epoch, consumed

    def __iter__(self) -> Iterator[int]:
        # a generator: the order is computed when the first index is asked for, so a `set_epoch`
        # between `iter(loader)` and the first batch (Lightning's order at epoch 0) still applies
        skip, self._skip = self._skip, 0
        yield from list(super().__iter__())[skip:]

    def __len__(self) -> int:
        # the whole epoch, also on a resumed pass: Lightning sizes its epoch from this and continues
        # its own batch count from the checkpoint
        return self.num_samples


class TrainPositionMixin:
    """The training position of a ``LightningDataModule``: its sampler, and the checkpoint state.

    The host class provides ``trainer``, ``seed``, ``batch_size``, ``_train_data()`` (the training rows)
    and initialises ``_resume`` and ``_train_sampler`` to ``None``.
    """

    trainer: Any
    seed: int
    batch_size: int
    _resume: dict[str, int] | None
    _train_sampler: ResumableSampler | None
    _train_data: Callable[[], Sized]

    def _train_sampler_for(self, data: Sized) -> ResumableSampler:
        """A sampler over ``data`` whose epoch ``e`` order is a function of ``(seed, e)`` alone."""
        trainer = self.trainer
        sampler = ResumableSampler(
            data,
            seed=self.seed,
            num_replicas=trainer.world_size if trainer is not None else 1,
            rank=trainer.global_rank if trainer is not None else 0,
        )
        if self._resume is not None:
            sampler.resume_at(self._resume["epoch"], self._resume["batches"] * self.batch_size)
            self._resume = None
        self._train_sampler = sampler
        return sampler

    def state_dict(self) -> dict[str, Any]:
        """The training position, which Lightning stores in its checkpoints.

        ``{"train_position": {"epoch", "batches", "batch_size", "examples"}}``: the epoch in progress, the
        batches of it this process has consumed, and the batch size and number of training rows that
        position refers to. Empty when no trainer is fitting with this module's loader.
        """
        trainer = self.trainer
        if trainer is None or self._train_sampler is None:
            return {}
        return {
            "train_position": {
                "epoch": int(trainer.current_epoch),
                # batches fetched in this epoch: Lightning does not read ahead of a sized loader
                "batches": int(trainer.fit_loop.epoch_loop.batch_progress.current.ready),
                "batch_size": self.batch_size,
                "examples": len(self._train_sampler.dataset),
            }
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue from a checkpoint's training position: the next ``train_dataloader`` starts there.

        Raises ``ValueError`` if the position was recorded for another batch size or number of
        training rows, where no position in this data maps to it.
        """
        position = state_dict.get("train_position")
        if position is None:
            return
        rows = len(self._train_data())
        if (position["batch_size"], position["examples"]) != (self.batch_size, rows):
            raise ValueError(
                f"the checkpoint was written while training on {position['examples']} rows in batches of "
                f"{position['batch_size']}; this data gives {rows} rows in batches of {self.batch_size}: resume "
                "with the data, max_length, packing and batch_size the checkpoint was trained with"
            )
        self._resume = {"epoch": int(position["epoch"]), "batches": int(position["batches"])}
        # Lightning warns that a mid-epoch resume restarts a plain DataLoader's epoch; this one's sampler continues
        warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch")

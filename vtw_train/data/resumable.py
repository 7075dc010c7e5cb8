"""A training loader whose position is part of the checkpoint, so a resumed run sees the batches it would have.

Why: Lightning restores the model, the optimizer and its step counters from a checkpoint, but a
plain shuffled ``DataLoader`` restarts its stream, so a run resumed at step 200 trains again on
the first batches and never sees the rest. :class:`ResumableDataLoader` exposes ``state_dict`` /
``load_state_dict`` (Lightning saves and restores them with the loops): the epoch and the number
of batches handed out. On restore, :class:`ResumableSampler` replays its seeded shuffle to that
epoch and skips what was already served, at the index level (nothing is loaded or collated twice).

The shuffle is the one ``DataLoader(shuffle=True, generator=torch.Generator().manual_seed(seed))``
draws (per epoch, the loader's worker seed and then one ``randperm``, from one generator), so an
uninterrupted run sees exactly the batches it saw before.
Under DDP the sampler shards each epoch's order itself (every rank draws the same permutation,
rank r takes positions r, r + W, ...), so the position is the same count on every rank.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


def _rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ResumableSampler(Sampler[int]):
    """Seeded shuffle (or identity order) over ``size`` samples, sharded per rank, that can skip ahead."""

    def __init__(self, size: int, seed: int = 0, shuffle: bool = True) -> None:
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.epoch = 0  # index of the epoch the next __iter__ starts
        self._skip = 0  # samples of that epoch (on this rank) already served before a restore
        self._generator = torch.Generator().manual_seed(seed)

    def _order(self) -> list[int]:
        order = (
            torch.randperm(self.size, generator=self._generator).tolist()
            if self.shuffle
            else list(range(self.size))
        )
        rank, world = _rank_and_world()
        if world == 1:
            return order
        per_rank = math.ceil(self.size / world)
        padded = order + order[: per_rank * world - self.size]  # as DistributedSampler pads
        return padded[rank::world]

    def __len__(self) -> int:
        _, world = _rank_and_world()
        return math.ceil(self.size / world)

    def __iter__(self) -> Iterator[int]:
        order = self._order()
        skip, self._skip = self._skip, 0
        self.epoch += 1
        yield from order[skip:]
        if self.shuffle:  # torch's RandomSampler draws a second permutation for the (empty) tail of an epoch
            torch.randperm(self.size, generator=self._generator)

    @property
    def generator(self) -> torch.Generator:
        """The generator the loader draws its worker seed from too (one stream, as ``shuffle=True`` has)."""
        return self._generator

    def restore(self, epoch: int, served: int) -> None:
        """Continue epoch ``epoch`` after its first ``served`` samples on this rank."""
        self._generator.manual_seed(self.seed)  # in place: the loader holds this generator too
        for _ in range(epoch):  # replay the draws of the earlier epochs: the loader's seed, then the orders
            torch.empty((), dtype=torch.int64).random_(generator=self._generator)
            if self.shuffle:
                torch.randperm(self.size, generator=self._generator)
                torch.randperm(self.size, generator=self._generator)
        self.epoch, self._skip = epoch, served


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` over a :class:`ResumableSampler` whose position Lightning checkpoints."""

    def __init__(
        self, dataset: Dataset, *, batch_size: int, sampler: ResumableSampler, **kwargs: Any
    ) -> None:
        if not isinstance(sampler, ResumableSampler):
            raise TypeError(
                "ResumableDataLoader needs a ResumableSampler; with DDP set trainer.use_distributed_sampler: false "
                "(the sampler shards itself)."
            )
        super().__init__(
            dataset, batch_size=batch_size, sampler=sampler, generator=sampler.generator, **kwargs
        )
        self._epoch = 0
        self._served = 0  # batches of the current epoch handed out, including those skipped on restore

    def __iter__(self) -> Iterator[Any]:
        sampler: ResumableSampler = self.sampler  # type: ignore[assignment]
        self._epoch = sampler.epoch
        self._served = sampler._skip // self.batch_size
        for batch in super().__iter__():
            self._served += 1  # counted when handed out: a checkpoint taken now includes this batch
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "batches": self._served, "batch_size": int(self.batch_size)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if int(state.get("batch_size", self.batch_size)) != self.batch_size:
            raise ValueError(
                f"the checkpoint was trained with data.batch_size {state['batch_size']}, this run uses "
                f"{self.batch_size}; resume with the batch size the run was started with."
            )
        self.sampler.restore(int(state["epoch"]), int(state["batches"]) * int(self.batch_size))  # type: ignore[attr-defined]
        self._epoch, self._served = int(state["epoch"]), int(state["batches"])

"""One process per GPU (or CPU slot) under torchrun: rank, world size, device, barriers.

A single process needs no launcher: WORLD_SIZE unset means world size 1 and every helper is a no-op.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from refine.errors import RefineError


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def on_main(self, action):
        """Run `action()` on rank 0 only; every rank gets its result (None elsewhere) or raises if it failed.

        Rank 0 raises the real error; the other ranks stop with a pointer to it instead of waiting forever.
        """
        result, failed = None, False
        if self.is_main:
            try:
                result = action()
            except BaseException:
                failed = True
                self._share(failed)
                raise
        if self._share(failed):
            raise RefineError("rank 0 stopped with an error (printed above); fix it and rerun")
        return result

    @contextlib.contextmanager
    def holding(self, claim):
        """Rank 0 claims the output with `claim()` and holds its lock for the block; every rank starts together."""
        claimed = self.on_main(claim)
        try:
            self.barrier()
            yield claimed
        finally:
            if claimed is not None:
                claimed.release()

    def share(self, value):
        """Rank 0's `value` (anything picklable), on every rank."""
        if self.world_size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _share(self, flag: bool) -> bool:
        if self.world_size == 1:
            return flag
        box = [flag]
        dist.broadcast_object_list(box, src=0)
        return bool(box[0])

    def owns(self, shard_index: int) -> bool:
        """Shards are dealt round-robin: rank r takes shards r, r + W, r + 2W, ..."""
        return shard_index % self.world_size == self.rank


def init_world(device_name: str = "auto") -> World:
    """Join the process group torchrun set up (NCCL for CUDA, gloo for CPU); world size 1 without torchrun."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return World()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and not device_name.startswith("cpu")
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        # Long timeout: ranks wait at the final barrier while the slowest rank finishes its shards.
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(hours=24))
    return World(rank, world_size, local_rank)


@contextlib.contextmanager
def joined_world(device_name: str = "auto"):
    """This process's place among torchrun's (world size 1 without torchrun), left again at the end."""
    world = init_world(device_name)
    try:
        yield world
    finally:
        close_world(world)


def close_world(world: World) -> None:
    if world.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def rank_device(device_name: str, world: World) -> str:
    """`auto`/`cuda` under torchrun means this rank's own GPU; in a task of the local executor, its slot's GPU."""
    if device_name not in ("auto", "cuda") or not torch.cuda.is_available():
        return device_name
    if world.world_size > 1:
        return f"cuda:{world.local_rank}"
    slot = os.environ.get("REFINE_TASK_SLOT")  # set by refine.engine.LocalTasks
    return f"cuda:{int(slot) % torch.cuda.device_count()}" if slot is not None else device_name


def torchrun_command(nproc: int, module_args: list[str]) -> list[str]:
    """`python -m torch.distributed.run --standalone --nproc_per_node N -m refine ...` for one machine."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "refine",
            *module_args]

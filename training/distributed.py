"""Training on several processes: ``torchrun --nproc_per_node=N -m training.run <task>``.

torchrun starts N copies of ``training.run`` with RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous address in the
environment. Each process then joins one process group (gloo on CPU, NCCL on GPU, one GPU per process), trains
its share of every epoch (:func:`sampler`) through DistributedDataParallel, which averages the gradients so that
every rank holds the same weights after every step, and sums its loss and accuracy totals with the others'
(:func:`all_reduce_sums`), so every rank takes the same checkpoint, learning-rate and early-stopping decisions.
Only rank 0 writes: logs, history, checkpoints, report, ONNX export and publication.

Without torchrun (WORLD_SIZE unset or 1) every function here is a no-op and training runs as one process.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sized

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler, Sampler


def launched() -> bool:
    """Whether this process is one of several started by torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: str) -> torch.device:
    """Join the process group when launched by torchrun; the device this process trains on."""
    if not launched():
        return torch.device(device)
    if device == "cuda":
        local = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=local)
        return local
    dist.init_process_group("gloo")
    return torch.device(device)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """Rank 0: the one process that logs and writes files."""
    return rank() == 0


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. to fill a cache), the other ranks after it."""
    if dist.is_initialized() and not is_main():
        dist.barrier()
    yield
    if dist.is_initialized() and is_main():
        dist.barrier()


def broadcast(value: object) -> object:
    """Rank 0's value on every rank (a picklable object such as the run folder's path)."""
    if not dist.is_initialized():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """The module that trains: DistributedDataParallel around the model under torchrun, else the model itself."""
    if not dist.is_initialized():
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def sampler(dataset: Sized, shuffle: bool, seed: int) -> Sampler | None:
    """This rank's share of the data: shuffled every epoch for training, a strided shard (no padding) otherwise."""
    if not dist.is_initialized():
        return None
    if shuffle:
        return DistributedSampler(dataset, shuffle=True, seed=seed)
    return _Shard(len(dataset), rank(), world_size())


class _Shard(Sampler):
    """Indices rank, rank + N, rank + 2N, ...: every item evaluated exactly once across ranks."""

    def __init__(self, size: int, rank: int, world: int) -> None:
        self.indices = range(rank, size, world)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def set_epoch(loader: torch.utils.data.DataLoader, epoch: int) -> None:
    """Reshuffle the training shards each epoch (DistributedSampler draws from seed + epoch)."""
    if isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(epoch)


def all_reduce_sums(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sums over all ranks (float64): totals of loss, correct answers and images."""
    if not dist.is_initialized():
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def broadcast_state(model: nn.Module) -> None:
    """Overwrite every rank's parameters and buffers with rank 0's (after rank 0 reloads the best checkpoint)."""
    if not dist.is_initialized():
        return
    with torch.no_grad():
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, src=0)

"""Training on several processes: the book's loop under ``torchrun`` (issue 13, "Beyond one machine").

    torchrun --nproc_per_node 4 -m diffusion_core.store digits-ddpm --profile gpu

runs four copies of the same program. :func:`diffusion_core.train.train` notices (:func:`init`
creates the process group from torchrun's environment when ``WORLD_SIZE > 1`` and none exists:
NCCL for CUDA, gloo for a CPU) and trains with DistributedDataParallel. The design, and the sense in
which the result equals training in one process at the same global batch:

* **Data.** Recipes pass an iterator of *global* batches from a seeded stream. Every process draws
  the same global batch of ``N`` examples and keeps its slice :func:`shard_bounds` (sizes differ by
  at most one when ``N`` is not a multiple of the world size ``W``). At the first step the processes
  compare a fingerprint of the batch, so a stream that is not seeded alike everywhere is an error,
  never a silent change of the data.
* **Gradients.** Each process's loss (the mean over its ``n_r`` examples) is weighted by
  ``n_r W / N`` (1 for equal slices) and DDP averages the gradients during the backward pass, so
  every process holds the gradient of the mean loss over the global batch, the one a single
  process computes. Clipping (after the backward pass, so of the averaged gradient), the float16
  loss scaler (every process finds the same overflow and skips the same step), AdamW and the EMA
  then run on identical numbers in every process and stay in step without further communication;
  the loss recorded each step is the global batch's mean. DDP wraps the whole loss, so ``loss_fn``
  still gets the plain model (its methods, attributes, adapters inside a frozen base all work);
  it runs with ``static_graph=True``: a parameter the loss never uses keeps no gradient, as in one
  process, and a loss that uses different parameters at different steps is an error from DDP.
* **Randomness in the loss.** Recipes draw ``t``, the noise and condition dropout per example from
  their own seeded generator (``diffusion.training_losses(m, x0, generator=g)``). Those draws go
  through :func:`batch_randn`, :func:`batch_rand` and :func:`batch_randint`: outside training, or in
  one process, they are exactly ``torch.randn`` & co.; during a sharded step they draw the whole
  global batch's values from the generator (which every process advances alike) and return this
  process's rows. So an example gets the same ``t`` and noise as in one process, and training is
  the same computation as in one process at the same global batch when the model draws no
  randomness of its own: only sums are taken in another order (float64 weights agree to about
  1e-13 after training; in float32 Adam, which divides a gradient by its own size, turns that
  rounding into up to a fraction of a learning-rate step where a gradient is near zero).
* **Torch's default generator** (dropout, ``torch.randn`` without a generator) cannot be sliced: a
  dropout layer sees only its slice. :func:`train` reseeds it per process when ``W > 1`` (a seed
  drawn alike everywhere, plus the rank), so masks are independent across processes as they are
  across the examples of one batch: training with dropout is equal *in distribution*, not in value.
  BatchNorm likewise normalises over the process's slice (the book's diffusion models use GroupNorm).
* **Losses must be means of per-example terms.** A loss that couples the examples of a batch, such
  as CLIP's contrastive loss (every caption against every image), sees only the process's slice:
  fewer negatives, a different objective. Train such a model in one process.
* **The store.** Every process trains (they must all take part); only rank 0 takes the store's
  lock, decides whether a cached file is valid, prints, shows progress bars and writes the file;
  the others wait for it and load it, so all return the same weights and metrics
  (:func:`diffusion_core.store.load`). ``$DIFFUSION_CACHE`` must be one folder every process sees.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["Shard", "init", "is_distributed", "rank", "world_size", "is_main", "barrier", "shard_bounds",
           "shard_batch", "sharded", "current_shard", "batch_randn", "batch_rand", "batch_randint",
           "check_same_batch", "run_on_main"]

#: how long a process waits for the others at a collective before failing (not forever)
TIMEOUT = datetime.timedelta(minutes=30)


# ----------------------------------------------------------------------------- the process group
def env_world_size() -> int:
    """``$WORLD_SIZE`` as torchrun sets it (1 when unset)."""
    value = os.environ.get("WORLD_SIZE", "1").strip() or "1"
    try:
        n = int(value)
    except ValueError:
        raise ValueError(f"WORLD_SIZE must be a positive integer, got {value!r}") from None
    if n < 1:
        raise ValueError(f"WORLD_SIZE must be a positive integer, got {value!r}")
    return n


def is_distributed() -> bool:
    """Whether a default process group exists (made by :func:`init`, torchrun's caller, or the user)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """The number of processes (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Whether this process is rank 0: the one that prints, shows bars and writes files."""
    return rank() == 0


def init(device: torch.device | str | None = None) -> bool:
    """Make the default process group from torchrun's environment if ``WORLD_SIZE > 1`` and none
    exists; return whether training is distributed (a process group exists).

    The backend is NCCL when ``device`` is a CUDA device (each process then uses GPU
    ``$LOCAL_RANK``), else gloo. A group made elsewhere (``dist.init_process_group`` before
    calling) is used as it is. The group made here is destroyed when the process exits.
    """
    if is_distributed():
        return True
    world = env_world_size()
    if world == 1:
        return False
    if not dist.is_available():
        raise RuntimeError(f"WORLD_SIZE={world} asks for distributed training, but this torch build has no "
                           f"torch.distributed")
    missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
    if missing:
        raise RuntimeError(f"WORLD_SIZE={world} but {', '.join(missing)} not set: start the processes with "
                           f"torchrun (torchrun --nproc_per_node {world} ...), which sets them")
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available()
                                                                           else "cpu")
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK={local} but this machine has {torch.cuda.device_count()} GPU(s): "
                               f"start at most one process per GPU (torchrun --nproc_per_node "
                               f"{torch.cuda.device_count()})")
        torch.cuda.set_device(local)
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend, timeout=TIMEOUT)
    atexit.register(_destroy)
    return True


def _destroy() -> None:
    if is_distributed():
        dist.destroy_process_group()


def _collective_device() -> torch.device:
    """Where tensors for a collective live: the current GPU for NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    """Wait for every process (nothing without a process group)."""
    if is_distributed():
        dist.barrier()


def run_on_main(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on rank 0 only and give its result (a picklable object) to every process; an
    exception on rank 0 is raised on every process (the others never wait for a result that will
    not come). Without a process group it is ``fn()``."""
    if not is_distributed():
        return fn()
    box: list[Any] = [None]
    if is_main():
        try:
            box[0] = ("ok", fn())
        except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
            box[0] = ("error", e)
    dist.broadcast_object_list(box, src=0, device=_collective_device())
    status, value = box[0]
    if status == "error":
        if is_main():
            raise value
        raise RuntimeError(f"rank 0 failed: {type(value).__name__}: {value}") from value
    return value


# ----------------------------------------------------------------------------- sharding the batch
@dataclass(frozen=True)
class Shard:
    """This process's rows ``start:stop`` of a global batch of ``total`` examples."""

    start: int
    stop: int
    total: int

    @property
    def size(self) -> int:
        return self.stop - self.start


def shard_bounds(total: int, rank: int, world: int) -> tuple[int, int]:
    """The rows ``(start, stop)`` of a batch of ``total`` examples that process ``rank`` of ``world``
    takes: contiguous, in rank order, sizes ``total // world`` or one more (the first
    ``total % world`` processes take one more)."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"shard_bounds: need 0 <= rank < world, got rank={rank}, world={world}")
    if total < world:
        raise ValueError(f"a global batch of {total} examples cannot be shared by {world} processes (each needs "
                         f"at least one); use a batch size of at least {world}")
    base, extra = divmod(total, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def _tensors(batch: Any) -> Iterator[torch.Tensor]:
    if torch.is_tensor(batch):
        yield batch
    elif isinstance(batch, (tuple, list)):
        for b in batch:
            yield from _tensors(b)
    elif isinstance(batch, dict):
        for b in batch.values():
            yield from _tensors(b)


def batch_size(batch: Any) -> int:
    """The global batch size: the first dimension of the batch's tensors, which must all share it
    (a batch is a tensor, or tuples, lists and dicts of them; other values are not per-example)."""
    sizes = {tuple(t.shape[:1]) for t in _tensors(batch)}
    if not sizes:
        raise ValueError("distributed training needs a batch with at least one tensor to divide among processes")
    if len(sizes) != 1 or () in sizes:
        shapes = [tuple(t.shape) for t in _tensors(batch)]
        raise ValueError(f"distributed training divides every tensor of a batch along its first dimension, so "
                         f"all need the same first dimension (the batch size); got shapes {shapes}")
    return next(iter(sizes))[0]


def shard_batch(batch: Any, shard: Shard) -> Any:
    """The rows ``shard.start:shard.stop`` of every tensor in ``batch`` (tuples, lists and dicts are
    kept; other values, such as a string, are passed as they are)."""
    if torch.is_tensor(batch):
        return batch[shard.start:shard.stop]
    if isinstance(batch, (tuple, list)):
        return type(batch)(shard_batch(b, shard) for b in batch)
    if isinstance(batch, dict):
        return {k: shard_batch(v, shard) for k, v in batch.items()}
    return batch


def _fingerprint(batch: Any) -> torch.Tensor:
    """Two numbers that differ, almost surely, between different batches (float64)."""
    total = torch.zeros(2, dtype=torch.float64)
    for t in _tensors(batch):
        v = t.detach().reshape(-1).to("cpu", torch.float64)
        w = torch.linspace(1.0, 2.0, v.numel(), dtype=torch.float64)
        total += torch.stack([v.sum(), (v * w).sum() + v.numel()])
    return total


def check_same_batch(batch: Any) -> None:
    """Raise ``ValueError`` on every process unless every process holds the same global ``batch``
    (compares a fingerprint: one small all-reduce)."""
    if not is_distributed():
        return
    fp = _fingerprint(batch).to(_collective_device())
    hi, lo = fp.clone(), -fp
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MAX)
    if not torch.equal(hi, -lo):
        raise ValueError("the processes drew different global batches: under torchrun every process must draw the "
                         "same batches, so seed the batch iterator with its own torch.Generator (as "
                         "data.digits.batches does) rather than torch's default generator")


# ----------------------------------------------------------------------------- per-example randomness
_SHARD: ContextVar[Shard | None] = ContextVar("diffusion_core_shard", default=None)


@contextlib.contextmanager
def sharded(shard: Shard | None) -> Iterator[None]:
    """Within this block, :func:`batch_randn` & co. draw for the global batch and return ``shard``'s
    rows (``None``: plain draws). :func:`diffusion_core.train.train` wraps each call of the loss."""
    token = _SHARD.set(shard)
    try:
        yield
    finally:
        _SHARD.reset(token)


def current_shard() -> Shard | None:
    """The shard of the training step in progress, or ``None``."""
    return _SHARD.get()


def _draw(fn: Callable[..., torch.Tensor], size: Sequence[int], generator: torch.Generator | None,
          **kwargs: Any) -> torch.Tensor:
    size = tuple(int(s) for s in size)
    shard = _SHARD.get()
    if shard is None or generator is None:
        # torch's default generator differs between processes (reseeded per rank): a local draw
        return fn(size, generator=generator, **kwargs)
    if not size or size[0] != shard.size:
        raise ValueError(f"a per-example draw during a sharded training step must have this process's batch "
                         f"size {shard.size} as its first dimension, got size {size}; draw other shapes with "
                         f"torch.randn & co.")
    return fn((shard.total, *size[1:]), generator=generator, **kwargs)[shard.start:shard.stop]


def batch_randn(size: Sequence[int], *, generator: torch.Generator | None = None, **kwargs: Any) -> torch.Tensor:
    """``torch.randn(size, generator=generator, **kwargs)`` for a batch: ``size[0]`` is the number of
    examples. During a sharded training step with a ``generator`` it draws the global batch's values
    and returns this process's rows, so each example gets the value it gets in one process."""
    return _draw(torch.randn, size, generator, **kwargs)


def batch_rand(size: Sequence[int], *, generator: torch.Generator | None = None, **kwargs: Any) -> torch.Tensor:
    """``torch.rand`` for a batch, sharded like :func:`batch_randn`."""
    return _draw(torch.rand, size, generator, **kwargs)


def batch_randint(low: int, high: int, size: Sequence[int], *, generator: torch.Generator | None = None,
                  **kwargs: Any) -> torch.Tensor:
    """``torch.randint(low, high, size)`` for a batch, sharded like :func:`batch_randn`."""
    return _draw(lambda s, **kw: torch.randint(low, high, s, **kw), size, generator, **kwargs)


def reseed_default_generator() -> None:
    """Give each process its own stream of torch's default generator (for dropout): a seed drawn
    alike in every process (they share the state) plus the rank. Nothing in one process."""
    if world_size() > 1:
        seed = int(torch.randint(0, 2**62, (1,)).item())
        torch.manual_seed(seed + rank())

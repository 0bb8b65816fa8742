"""The training loop every chapter uses: AdamW, EMA with warm-up, clipping, mixed precision, progress.

    loss = loss_fn(model, batch)        # a scalar
    theta <- AdamW(theta, grad)         # with gradient clipping at ``grad_clip``
    theta_ema <- d theta_ema + (1 - d) theta,   d = min(decay, (1 + n) / (10 + n))

The warm-up of the EMA decay matters for short runs: with a fixed decay of 0.9999, after 2,000
steps 82% of the EMA weights would still be the random initialisation.

Under ``torchrun`` the same loop trains with DistributedDataParallel, each process on its slice of
every global batch, and equals training in one process at that global batch
(:mod:`diffusion_core.distributed` says in which sense).
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from . import distributed
from .profiles import Profile, current


class EMA:
    """Exponential moving average of a model's parameters (buffers are copied)."""

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1), got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.updates = 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def current_decay(self) -> float:
        """d = min(decay, (1 + n) / (10 + n)) with warm-up, else ``decay``."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        ema_params = list(self.model.parameters())
        params = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_params, params, 1.0 - d)  # ema <- ema + (1 - d)(p - ema)
        for eb, b in zip(self.model.buffers(), model.buffers()):
            eb.copy_(b)
        self.updates += 1


@dataclass
class TrainConfig:
    """How to train: ``steps`` optimiser steps of AdamW at ``lr`` (linear warm-up, cosine decay to
    ``final_lr_fraction`` of it), EMA ``ema_decay``, clipping at ``grad_clip`` (0 turns it off)."""

    steps: int
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 100
    final_lr_fraction: float = 0.1
    ema_decay: float = 0.999
    ema_warmup: bool = True
    grad_clip: float = 1.0
    cpu_amp: bool = False  # bf16 autocast on a CPU with native bf16 too (profile.amp); CUDA always uses
    #                        mixed precision: bf16, or fp16 with loss scaling before Ampere (profile.amp_dtype)
    channels_last: bool = False  # measured slower with this UNet on CPU (GroupNorm); an option for GPUs
    log_every: int = 50
    desc: str = "training"

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 1:
            raise ValueError(f"TrainConfig: steps must be a positive integer, got {self.steps!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"TrainConfig: lr must be a finite number > 0, got {self.lr!r}")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"TrainConfig: warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        if not isinstance(self.log_every, int) or self.log_every < 1:
            raise ValueError(f"TrainConfig: log_every must be a positive integer, got {self.log_every!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"TrainConfig: ema_decay must lie in [0, 1) (0 turns the EMA off), got {self.ema_decay!r}")
        if not 0.0 <= self.final_lr_fraction <= 1.0:
            raise ValueError(f"TrainConfig: final_lr_fraction must lie in [0, 1], got {self.final_lr_fraction!r}")
        if not (self.grad_clip >= 0 and math.isfinite(self.grad_clip)):
            raise ValueError(f"TrainConfig: grad_clip must be a finite number >= 0 (0 turns it off), got {self.grad_clip!r}")

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        cos = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return self.lr * (self.final_lr_fraction + (1 - self.final_lr_fraction) * cos)


@dataclass
class TrainResult:
    model: nn.Module          # the trained model (in train mode)
    ema: nn.Module | None     # the EMA copy (eval mode), what chapters sample from
    losses: list[float] = field(default_factory=list)  # the loss every step
    seconds: float = 0.0

    @property
    def best(self) -> nn.Module:
        return self.ema if self.ema is not None else self.model


def train(model: nn.Module, loss_fn: Callable[[nn.Module, Any], torch.Tensor], batches: Iterator[Any],
          config: TrainConfig, profile: Profile | None = None, progress: bool = True,
          callback: Callable[[int, nn.Module, EMA | None], None] | None = None) -> TrainResult:
    """Train ``model`` in place for ``config.steps`` steps on ``batches`` (an iterator, or an
    iterable such as a list, which is iterated once; one batch per step: running out of batches
    before ``config.steps`` is a ``ValueError`` saying after how many steps).

    ``loss_fn(model, batch)`` returns a scalar loss; batches are moved to the profile's device.
    Mixed precision (autocast to ``profile.amp_dtype``) is used on CUDA, and on a CPU with native bf16
    when ``config.cpu_amp`` asks for it (``profile.amp`` says whether the machine has it). In float16
    (a CUDA GPU before Ampere, such as a T4) the loss is scaled (``torch.amp.GradScaler``): the
    gradients are unscaled before clipping, and a step whose gradients overflowed is skipped while the
    scale shrinks. ``callback(step, model, ema)`` runs every ``log_every`` steps (e.g. to measure
    adherence during training, chapter 07).

    Several processes (``torchrun``; the process group is made here from its environment when
    ``WORLD_SIZE > 1`` and none exists, :func:`diffusion_core.distributed.init`): every process
    draws the same global batch from ``batches`` and computes ``loss_fn`` on its slice, the model
    wrapped in DistributedDataParallel (``loss_fn`` still receives the plain ``model``, whose methods
    and attributes it may use); gradients are averaged over the global batch, so the optimiser and
    the EMA stay identical everywhere. ``losses`` are the global batch's. Only rank 0 shows the bar
    and the callbacks' printed output (callbacks run everywhere, so generators they share with
    ``loss_fn`` advance alike).
    """
    profile = profile or current()
    try:
        batches = iter(batches)
    except TypeError:
        raise TypeError(f"train: batches must be an iterator or iterable of batches, got "
                        f"{type(batches).__name__}") from None
    device = profile.device
    parallel = distributed.init(device)
    rank, world = distributed.rank(), distributed.world_size()
    model.to(device).train()
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters")
    step_loss = _LossStep(model, loss_fn)
    if parallel:
        # DDP copies rank 0's parameters and buffers to every process here, and averages gradients
        # in the backward pass; it wraps the loss so that loss_fn may use the model any way it likes
        ids = [device.index if device.index is not None else torch.cuda.current_device()] \
            if device.type == "cuda" else None
        step_loss = nn.parallel.DistributedDataParallel(step_loss, device_ids=ids, static_graph=True)
        distributed.reseed_default_generator()  # dropout: independent masks per process
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=config.lr, betas=config.betas,
                            foreach=True, fused=False if device.type == "cpu" else None)
    ema = EMA(model, config.ema_decay, config.ema_warmup) if config.ema_decay > 0 else None
    amp_dtype = profile.amp_dtype if (device.type != "cpu" or config.cpu_amp) else None
    scaler = _grad_scaler(device) if amp_dtype == torch.float16 else None  # bf16 needs no loss scaling
    losses: list[float] = []
    start = time.perf_counter()
    bar = tqdm(range(config.steps), desc=config.desc, disable=not progress or rank != 0, leave=False)
    running = None
    for step in bar:
        try:
            batch = next(batches)
        except StopIteration:
            bar.close()
            raise ValueError(f"train: the batch iterator ran out after {step} of {config.steps} steps; give an "
                             f"endless iterator (e.g. data.digits.batches) or at least {config.steps} batches") from None
        shard = None
        if parallel:
            if step == 0:
                distributed.check_same_batch(batch)
            n = distributed.batch_size(batch)
            shard = distributed.Shard(*distributed.shard_bounds(n, rank, world), n)
            batch = distributed.shard_batch(batch, shard)
        batch = _to(batch, device)
        for g in opt.param_groups:
            g["lr"] = config.lr_at(step)
        with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None), \
                distributed.sharded(shard):
            loss = step_loss(batch)
        if not torch.is_tensor(loss) or loss.numel() != 1:
            raise ValueError(f"train: loss_fn must return a scalar tensor (average the per-sample losses), got "
                             f"{tuple(loss.shape) if torch.is_tensor(loss) else type(loss).__name__}")
        loss = loss.reshape(())
        if shard is not None:
            # the global batch's mean loss is sum_r (n_r / N) loss_r; DDP averages gradients over the
            # W processes, so a loss weighted by n_r W / N gives the global mean's gradient
            global_loss = loss.detach().to(torch.promote_types(loss.dtype, torch.float32)) * (shard.size / shard.total)
            torch.distributed.all_reduce(global_loss)
            if shard.size * world != shard.total:
                loss = loss * (shard.size * world / shard.total)
        else:
            global_loss = loss.detach()
        if not torch.isfinite(global_loss):  # the same on every process: all stop together
            raise FloatingPointError(f"the loss became {global_loss.item()} at step {step}; lower the learning rate")
        opt.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            if config.grad_clip > 0:  # after backward: DDP has averaged the gradients by now
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip, foreach=True)
            opt.step()
        else:
            scaler.scale(loss).backward()
            if config.grad_clip > 0:
                scaler.unscale_(opt)  # clip the true gradients, not the scaled ones
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip, foreach=True)
            scaler.step(opt)  # skipped when a gradient is inf or NaN (alike in every process)
            scaler.update()
        if ema is not None:
            ema.update(model)
        value = global_loss.item()
        losses.append(value)
        running = value if running is None else 0.98 * running + 0.02 * value
        if step % config.log_every == 0 or step == config.steps - 1:
            bar.set_postfix(loss=f"{running:.4f}")
            if callback is not None:
                quiet = contextlib.redirect_stdout(io.StringIO()) if rank != 0 else contextlib.nullcontext()
                with quiet:
                    callback(step, model, ema)
    seconds = time.perf_counter() - start
    return TrainResult(model=model, ema=ema.model if ema else None, losses=losses, seconds=seconds)


class _LossStep(nn.Module):
    """``loss_fn(model, batch)`` as a module, so that DistributedDataParallel can wrap the whole loss:
    its forward is where DDP prepares the gradient averaging, and ``loss_fn`` keeps the plain model."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, Any], torch.Tensor]):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> torch.Tensor:
        return self.loss_fn(self.model, batch)


def _grad_scaler(device: torch.device) -> Any:
    """A loss scaler for float16 training on ``device`` (``torch.amp.GradScaler``, torch >= 2.3;
    ``torch.cuda.amp.GradScaler`` before)."""
    if hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler(device.type)
    if device.type == "cuda":
        return torch.cuda.amp.GradScaler()
    raise RuntimeError(f"float16 training on {device.type} needs torch >= 2.3 (torch.amp.GradScaler)")


def _to(batch: Any, device: torch.device) -> Any:
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    return batch

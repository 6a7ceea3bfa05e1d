"""Training on torch.distributed: process group, data sharding, DDP / FSDP2 wrapping, reductions.

Used by ``train`` when ``TrainConfig.distributed`` is "ddp" or "fsdp" and the process was
started by ``torchrun`` (RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT set).

Why a 2-rank run reproduces a 1-process run on the same global batch: every rank draws the
*global* micro-batch (``batch_size * world_size`` rows, same loader state everywhere) and the
objective's augmentation points for all of it from the same generator, then keeps its own
rows (:meth:`DistContext.shard`). Every row carries the same number of targets (positions x
N_A) and the shards are equal, so the global mean loss is the mean of the ranks' means, which
is what DDP's and FSDP's mean gradient reduction computes. Loader position and generator
states are therefore identical on every rank and independent of the world size, which is
what lets a checkpoint resume at another world size.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor, nn

MODES = ("ddp", "fsdp")
_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class DistributedError(RuntimeError):
    """A collective failed (a peer rank died, hung past the timeout, or the group broke)."""


@dataclass
class DistContext:
    """This process's place in the group and how the model is wrapped."""

    mode: str
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    timeout_s: float

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that prints, shows progress and writes reports."""
        return self.rank == 0

    def shard(self, batch: Tensor) -> Tensor:
        """This rank's rows of a global batch [world_size * b, ...] (contiguous block of b rows)."""
        n = batch.shape[0]
        if n % self.world_size:
            raise ValueError(f"global batch of {n} rows does not split over {self.world_size} ranks")
        b = n // self.world_size
        return batch[self.rank * b : (self.rank + 1) * b]

    def all_sum(self, values: Sequence[float]) -> list[float]:
        """Sum of ``values`` over all ranks (float64 on the CPU / the rank's device)."""
        dev = self.device if self.backend == "nccl" else torch.device("cpu")
        t = torch.tensor(list(values), dtype=torch.float64, device=dev)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.cpu().tolist()

    def barrier(self) -> None:
        """Wait for every rank (raises after the group's timeout)."""
        dist.barrier()


def launched_by_torchrun() -> bool:
    """Whether the torchrun environment variables are all set."""
    return all(k in os.environ for k in _ENV)


def env_rank() -> int:
    """RANK from the environment (0 when not under torchrun)."""
    return int(os.environ.get("RANK", "0"))


def init_distributed(mode: str, device: str = "auto", timeout_s: float = 300.0) -> DistContext:
    """Join the process group torchrun describes: nccl on CUDA, gloo on the CPU.

    ``timeout_s`` bounds every collective: when a peer dies or hangs, the others raise
    instead of waiting forever. Raises ValueError for a bad mode / device / timeout or when
    the process was not started by torchrun.
    """
    if mode not in MODES:
        raise ValueError(f"distributed must be one of {MODES}, got {mode!r}")
    if not timeout_s > 0:
        raise ValueError(f"dist_timeout must be > 0 seconds, got {timeout_s}")
    if not launched_by_torchrun():
        missing = [k for k in _ENV if k not in os.environ]
        raise ValueError(
            f"--distributed {mode} needs torchrun (missing {', '.join(missing)}); run "
            "`torchrun --nproc-per-node N -m cacheaug_engine.cli.main train --distributed ...`"
        )
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    want_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if want_cuda:
        if not torch.cuda.is_available():
            raise ValueError("device cuda requested but no CUDA device is available")
        dev = torch.device("cuda", local % torch.cuda.device_count())
        torch.cuda.set_device(dev)
        backend = "nccl"
    elif device in ("auto", "cpu"):
        dev, backend = torch.device("cpu"), "gloo"
    else:
        raise ValueError(f"device must be auto, cpu or cuda under --distributed, got {device!r}")
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return DistContext(mode, rank, world, local, dev, backend, float(timeout_s))


def shutdown(ctx: DistContext | None) -> None:
    """Leave the process group (after a successful run only: a broken group may hang here)."""
    if ctx is not None and dist.is_initialized():
        dist.destroy_process_group()


def wrap(objective: nn.Module, ctx: DistContext, *, mixed_precision: bool | None = None) -> nn.Module:
    """The module to call for training steps.

    ddp: DistributedDataParallel over the objective; only parameters with requires_grad (the
    coprocessor's adapters / copy, soft tokens, scale) get gradient buckets.
    fsdp: FSDP2 ``fully_shard`` per transformer block, decoder block i and coprocessor block i
    in one group (a LoRA coprocessor shares the decoder's frozen weights, and FSDP2 needs a
    shared parameter in one group), then the objective as root (embeddings, final norm, head,
    soft tokens). Frozen weights are sharded too and all-gathered for each forward. On CUDA
    (``mixed_precision`` None = on CUDA) parameters compute in bf16 and gradients reduce in fp32.
    """
    if ctx.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        return DistributedDataParallel(objective, device_ids=ids)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    if mixed_precision is None:
        mixed_precision = ctx.device.type == "cuda"
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision else None
    kw = {"mesh": mesh} if mp is None else {"mesh": mesh, "mp_policy": mp}
    dec_layers = list(objective.decoder.layers)
    cop_layers = list(objective.coprocessor.model.layers)
    for d, c in zip(dec_layers, cop_layers, strict=True):
        fully_shard([d, c], **kw)
    fully_shard(objective, **kw)
    return objective


@contextlib.contextmanager
def root_unsharded(model: nn.Module, ctx: DistContext | None) -> Iterator[None]:
    """fsdp: hold the root group's parameters (embeddings, final norm, head, soft tokens) gathered
    for code that calls the decoder's or coprocessor's methods directly instead of the root
    forward (the held-out eval with its controls); blocks still gather through their own hooks."""
    if ctx is None or ctx.mode != "fsdp":
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


@contextlib.contextmanager
def grad_sync(model: nn.Module, ctx: DistContext, sync: bool) -> Iterator[None]:
    """Reduce gradients in this backward only when ``sync`` (the last micro-batch of a step)."""
    if ctx.mode == "ddp":
        with contextlib.nullcontext() if sync else model.no_sync():
            yield
    else:
        model.set_requires_gradient_sync(sync)
        yield


def _local_bytes(t: Tensor) -> int:
    local = t.to_local() if hasattr(t, "to_local") else t
    return local.numel() * local.element_size()


def memory_report(objective: nn.Module, ctx: DistContext) -> str:
    """One line: this setup's memory per rank (the largest rank), gathered over all ranks.

    Counts the parameters each rank holds (sharded under fsdp), the trainable part's
    gradients and AdamW's two fp32 moments; activations come on top (and the CUDA peak
    after the first step is what to watch on a GPU).
    """
    seen: set[int] = set()
    frozen = trainable = 0
    for p in objective.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if p.requires_grad:
            trainable += _local_bytes(p)
        else:
            frozen += _local_bytes(p)
    mine = [frozen, trainable]
    everyone: list[list[int]] = [[] for _ in range(ctx.world_size)]
    dist.all_gather_object(everyone, mine)
    frozen, trainable = max(e[0] for e in everyone), max(e[1] for e in everyone)
    opt = 2 * trainable  # AdamW exp_avg + exp_avg_sq, same dtype as the (fp32) parameters
    total = frozen + 2 * trainable + opt
    line = (
        f"memory per rank ({ctx.mode}, {ctx.world_size} ranks, {ctx.backend}): {_size(total)} = "
        f"frozen weights {_size(frozen)} + trainable {_size(trainable)} + grads {_size(trainable)} "
        f"+ AdamW {_size(opt)} (largest rank; activations extra)"
    )
    if ctx.device.type == "cuda":
        line += f"; CUDA allocated now {_size(torch.cuda.memory_allocated(ctx.device))}"
    return line


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


_COLLECTIVE_SIGNS = ("gloo", "nccl", "connection closed", "connection reset", "timed out", "timeout", "socket")


def is_collective_failure(exc: BaseException) -> bool:
    """Whether ``exc`` comes from a broken process group (peer died or hung) rather than a bug."""
    if isinstance(exc, dist.DistError):
        return True
    return isinstance(exc, RuntimeError) and any(s in str(exc).lower() for s in _COLLECTIVE_SIGNS)


def describe_failure(exc: BaseException, timeout_s: float | None) -> str:
    """The one line a rank prints when a collective fails."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    limit = f" or stopped answering for --dist-timeout {timeout_s:g} s" if timeout_s else ""
    return f"rank {env_rank()}: a collective failed: another rank died{limit} ({type(exc).__name__}: {text[:300]})"

"""A distributed checkpoint written in this process: a gloo group of one rank (issue 28).

Lets the distributed checkpoint's save order and its readers be tested without torchrun and
without depending on another test having run first.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from model_fixtures import tiny_decoder

from cacheaug_engine.augment.coprocessor import Coprocessor
from cacheaug_engine.augment.objective import CacheAugmentationObjective
from cacheaug_engine.train.dist_checkpoint import save_dist_checkpoint


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def one_rank_group() -> Iterator[None]:
    """A gloo process group of world size 1 for the duration of the block."""
    if dist.is_initialized():
        raise RuntimeError("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def write_dist_checkpoint(path: Path, steps: tuple[int, ...] = (1,)) -> Path:
    """Train a tiny coprocessor one AdamW step per entry of ``steps`` and save a distributed checkpoint
    at ``path`` after each (so the later saves replace an existing one). Needs ``one_rank_group``."""
    dec = tiny_decoder("llama")
    obj = CacheAugmentationObjective(dec, Coprocessor(dec, 2, lora_rank=2), ahead=3, num_positions=2)
    opt = torch.optim.AdamW([p for p in obj.parameters() if p.requires_grad], lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    for step in steps:
        obj(ids).loss.backward()
        opt.step()
        opt.zero_grad()
        save_dist_checkpoint(path, objective=obj, model=obj, opt=opt, generators={"positions": gen},
                             state={"step": step, "coprocessor": obj.coprocessor.config.to_dict()})  # fmt: skip
    return path

"""Count host syncs (Tensor.item / int / bool / float / tolist / __index__) with a TorchFunctionMode.

On a GPU each such call waits for the device; on the CPU they are free, so tests count them instead.

    with SyncCounter() as sc:
        step()
    assert sc.count <= 4, sc.calls
"""

from __future__ import annotations

import traceback
from collections import Counter

import torch
from torch.overrides import TorchFunctionMode

_SYNC_METHODS = {
    torch.Tensor.item: "item",
    torch.Tensor.__int__: "__int__",
    torch.Tensor.__bool__: "__bool__",
    torch.Tensor.__float__: "__float__",
    torch.Tensor.__index__: "__index__",
    torch.Tensor.tolist: "tolist",
}


class SyncCounter(TorchFunctionMode):
    """Counts calls that read a tensor's value back to the host; ``where`` names the calling lines."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.where: Counter[str] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = _SYNC_METHODS.get(func)
        if name is not None:
            self.count += 1
            frame = next(
                (f for f in reversed(traceback.extract_stack()[:-1]) if "sync_counter" not in f.filename
                 and "/torch/" not in f.filename),
                None,
            )
            self.where[f"{name} at {frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}" if frame else name] += 1
        return func(*args, **(kwargs or {}))

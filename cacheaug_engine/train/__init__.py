"""Training: the ``Trainer`` (stateful: state_dict / load_state_dict), its ``TrainConfig``, checkpoints
(plain and distributed, one atomic-write helper), DDP / FSDP2, the NaN guard and preflight checks."""

from __future__ import annotations

from cacheaug_engine.train.config import TrainConfig
from cacheaug_engine.train.trainer import TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "train"]

"""Cache augmentation: the coprocessor, the multi-position layout and the training objective."""

from .coprocessor import Coprocessor, CoprocessorConfig
from .layout import BlockLayout, block_layout, sample_positions, stride_positions
from .lora import LoRALinear
from .objective import CacheAugmentationObjective, ObjectiveOutput

__all__ = [
    "BlockLayout",
    "CacheAugmentationObjective",
    "Coprocessor",
    "CoprocessorConfig",
    "LoRALinear",
    "ObjectiveOutput",
    "block_layout",
    "sample_positions",
    "stride_positions",
]

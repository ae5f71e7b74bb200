"""Training: data sources, the ``Distiller`` loop, recipes, the embedded demo."""

from kdfast.train.data import CachedBatches, TokenBatches
from kdfast.train.distiller import Distiller, TrainConfig

__all__ = ["CachedBatches", "Distiller", "TokenBatches", "TrainConfig"]

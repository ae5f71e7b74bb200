"""Training: data sources, the ``Distiller`` loop, runs as plans of stages (``run_plan``), recipes,
the embedded demo."""

from kdfast.train.data import CachedBatches, TokenBatches
from kdfast.train.distiller import Distiller, TrainConfig
from kdfast.train.stage import Plan, Stage, StageLoss, run_plan

__all__ = ["CachedBatches", "Distiller", "Plan", "Stage", "StageLoss", "TokenBatches", "TrainConfig", "run_plan"]

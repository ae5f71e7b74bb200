"""The three distillation recipes (``kdfast distill --recipe NAME``), each a settings dataclass
with the papers' defaults and a ``plan(cfg) -> Plan`` (its list of
:class:`~kdfast.train.stage.Stage`), which :func:`kdfast.train.stage.run_plan` runs:

- ``distilbert``: :mod:`kdfast.train.recipes.distilbert`
- ``tinybert``: :mod:`kdfast.train.recipes.tinybert`
- ``mobilebert``: :mod:`kdfast.train.recipes.mobilebert`

Example configurations: ``kdfast/train/recipes/configs/*.yaml``.
"""

from __future__ import annotations

from importlib import import_module
from pathlib import Path

from kdfast.train.recipes.config import config_to_dict, load_config

RECIPES = ("distilbert", "tinybert", "mobilebert")
_CLASSES = {"distilbert": "DistilBertRecipe", "tinybert": "TinyBertRecipe", "mobilebert": "MobileBertRecipe"}
CONFIG_DIR = Path(__file__).parent / "configs"


def _module(name: str):
    if name not in RECIPES:
        raise ValueError(f"recipe must be one of {RECIPES}, got {name!r}")
    return import_module(f"kdfast.train.recipes.{name}")


def recipe_config(name: str, config: str | None = None, sets: list[str] | tuple = (),
                  overrides: dict | None = None):
    """The settings of recipe ``name``: defaults < YAML ``config`` < ``sets`` (``key=value``) <
    ``overrides`` ({dotted key: value}); ``overrides["steps"]`` sets every stage's step count."""
    mod = _module(name)
    overrides = dict(overrides or {})
    if "steps" in overrides:
        steps = overrides.pop("steps")
        overrides.update({key: steps for key in mod.STEP_KEYS})
    return load_config(getattr(mod, _CLASSES[name]), config, sets, overrides)


def recipe_plan(name: str, cfg):
    """The :class:`~kdfast.train.stage.Plan` of recipe ``name`` with settings ``cfg``: its stages
    (``recipe_plan(name, cfg)[i]``: model, step loss, data, train config), built and ready to run;
    building it checks the settings, seeds, loads the teacher and builds the teacher cache."""
    return _module(name).plan(cfg)


def run_recipe(name: str, cfg, *, resume: bool = False, allow_changed_settings: bool = False) -> dict:
    """Run recipe ``name`` with settings ``cfg`` (from :func:`recipe_config`): its plan
    (:func:`recipe_plan`) through :func:`kdfast.train.stage.run_plan`; returns its report.
    ``resume``: continue from the checkpoints in ``cfg.out_dir``, refusing ones written with other
    settings unless ``allow_changed_settings`` (then the new settings apply from there on)."""
    from kdfast.train import stage

    return stage.run_plan(recipe_plan(name, cfg), resume=resume, allow_changed_settings=allow_changed_settings)


__all__ = ["CONFIG_DIR", "RECIPES", "config_to_dict", "recipe_config", "recipe_plan", "run_recipe"]

"""The shipped recipe YAML files hold the recipes' defaults, key by key; MobileBERT's ``--steps``
sets ``pretrain.steps`` only where the YAML file and ``--set`` leave it unset."""

import pytest
import yaml

from kdfast.cli import main
from kdfast.train.recipes import CONFIG_DIR, RECIPES, config_to_dict, recipe_config


def flat(settings: dict, prefix: str = "") -> dict:
    """{dotted key: value} of a settings dict (``task.options``, a free mapping, stays one value)."""
    out = {}
    for key, value in settings.items():
        if isinstance(value, dict) and value and f"{prefix}{key}" != "task.options":
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def dotted_keys(data: dict, prefix: str = "") -> list[str]:
    """The dotted keys a YAML file sets (leaves only)."""
    keys = []
    for key, value in data.items():
        if isinstance(value, dict) and value:
            keys += dotted_keys(value, f"{prefix}{key}.")
        else:
            keys.append(f"{prefix}{key}")
    return keys


def test_every_recipe_ships_a_yaml_file():
    assert sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")) == sorted(RECIPES)


@pytest.mark.parametrize("recipe", RECIPES)
def test_shipped_yaml_equals_the_recipes_defaults_key_by_key(recipe):
    path = CONFIG_DIR / f"{recipe}.yaml"
    written = yaml.safe_load(path.read_text())
    defaults = flat(config_to_dict(recipe_config(recipe)))
    listed = dotted_keys(written)
    assert len(listed) >= 10  # the file documents the settings, it is not empty
    for key in listed:  # every key the file writes is a setting, with the default's value
        assert key in defaults, f"{path.name}: {key} is not a setting of {recipe}"
        assert written_value(written, key) == defaults[key] or _same_number(written_value(written, key),
                                                                              defaults[key]), \
            f"{path.name}: {key} is {written_value(written, key)!r}, the recipe's default {defaults[key]!r}"
    loaded = flat(config_to_dict(recipe_config(recipe, str(path))))
    assert {k: v for k, v in loaded.items() if v != defaults[k]} == {}


def written_value(data: dict, dotted: str):
    for part in dotted.split("."):
        data = data[part]
    return data


def _same_number(a, b) -> bool:
    """PyYAML reads 5.0e-4 as a float but 5e-4 as a string: compare a number to its spelling."""
    try:
        return float(a) == float(b) and not isinstance(a, bool) and not isinstance(b, bool)
    except (TypeError, ValueError):
        return False


def test_mobilebert_steps_flag_leaves_an_explicit_pretrain_steps_alone(tmp_path):
    stage_one_only = tmp_path / "m.yaml"
    stage_one_only.write_text("pretrain:\n  steps: 0\npkt:\n  steps_per_layer: 9\n")
    cfg = recipe_config("mobilebert", str(stage_one_only), [], {"steps": 5})
    assert (cfg.pkt.steps_per_layer, cfg.pretrain.steps) == (5, 0)  # the flag wins over the file's 9, not its 0
    cfg = recipe_config("mobilebert", None, ["pretrain.steps=7"], {"steps": 5})
    assert (cfg.pkt.steps_per_layer, cfg.pretrain.steps) == (5, 7)
    cfg = recipe_config("mobilebert", str(stage_one_only), ["pretrain.steps=3"], {"steps": 5})
    assert cfg.pretrain.steps == 3  # --set over the file, as always
    cfg = recipe_config("mobilebert", None, [], {"steps": 5})
    assert (cfg.pkt.steps_per_layer, cfg.pretrain.steps) == (5, 5)  # nothing explicit: --steps sets both stages
    cfg = recipe_config("mobilebert", str(CONFIG_DIR / "mobilebert.yaml"), [], {"steps": 4})
    assert (cfg.pkt.steps_per_layer, cfg.pretrain.steps) == (4, 100)  # the shipped file sets pretrain.steps
    cfg = recipe_config("distilbert", str(CONFIG_DIR / "distilbert.yaml"), [], {"steps": 4})
    assert cfg.steps == 4  # other recipes: the flag over the file, unchanged


def test_mobilebert_print_config_shows_the_kept_pretrain_steps(tmp_path, capsys):
    stage_one_only = tmp_path / "m.yaml"
    stage_one_only.write_text("pretrain:\n  steps: 0\n")
    assert main(["distill", "--recipe", "mobilebert", "--config", str(stage_one_only), "--steps", "6",
                 "--out", str(tmp_path / "o"), "--print-config"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out.split("\n", 1)[1])
    assert shown["pkt"]["steps_per_layer"] == 6 and shown["pretrain"]["steps"] == 0

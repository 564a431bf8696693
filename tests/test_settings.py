"""utils/settings.py is the one source of every choice and default the scripts show."""

import argparse

import pytest

import data_gen
import evaluation
import train
from utils import settings
from utils.settings import EVALUATE, PREPARE, TRAINING, Setting


def _actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {action.dest: action for action in parser._actions if action.dest != "help"}


@pytest.mark.parametrize(("script", "table"), [(data_gen, PREPARE), (evaluation, EVALUATE)])
def test_every_flag_default_is_the_settings_default(script, table):
    actions = _actions(script.build_parser())
    for key, setting in table.items():
        assert key in actions, f"{script.__name__}.py has no flag for setting {key!r}"
        assert actions[key].default == setting.default, key
        assert "(default: " in actions[key].help, key
        if setting.choices is not None:
            assert list(actions[key].choices) == list(setting.choices), key


def test_train_flags_name_the_settings_default_and_leave_it_to_the_config():
    actions = _actions(train.build_parser())
    for key, setting in TRAINING.items():
        assert key in actions, f"train.py has no flag for setting {key!r}"
        assert actions[key].default is None, key  # so that a --config file can set it and a given flag wins
        assert actions[key].help == setting.help_text(), key


def test_train_resolves_unset_settings_to_the_settings_defaults():
    args = vars(train.build_parser().parse_args([]))
    unset = {key for key in TRAINING if args[key] is None}
    assert unset == set(TRAINING)
    assert settings.defaults(TRAINING)["lr"] == 3e-3 and settings.defaults(TRAINING)["augment"] == "light"


def test_evaluation_options_default_to_the_settings():
    from utils.evaluate.options import Options

    options = Options()
    for key in ("overlap", "blend", "postprocess", "connectivity", "metrics", "nsd_tolerance", "pictures"):
        assert getattr(options, key) == EVALUATE[key].default, key


def test_names_match_their_implementations():
    # The modules that implement these names are heavy (Keras, SimpleITK), so settings.py lists the names itself.
    import model
    from utils import losses
    from utils.formats import FORMATS

    assert settings.MODEL_NAMES == tuple(model.MODELS)
    assert set(settings.LOSS_NAMES) == set(losses.LOSSES)
    assert settings.LAYOUTS == tuple(FORMATS)


def test_settings_import_nothing_heavy():
    import subprocess
    import sys

    heavy = "('keras', 'tensorflow', 'numpy')"
    code = f"import sys, utils.settings, utils.cli; print(sorted(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=train.__file__.rsplit("/", 1)[0]
    )
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("setting", "good", "bad", "words"),
    [
        (TRAINING["lr"], [1e-3, 2], [0, -1.0, "fast", True, float("nan")], "a positive number"),
        (TRAINING["batch_size"], [1, 8], [0, 2.5, True], "an integer >= 1"),
        (TRAINING["patch_size"], [[16, 16], (8, 8, 8)], [[0, 16], [16, "a"], 16], "a list of positive integers"),
        (TRAINING["model"], ["unet2d"], ["nonet3d", 3], "one of ['unet2d'"),
        (TRAINING["tensorboard"], [True, False], [1, "yes"], "true or false"),
        (TRAINING["model_args"], [{}, {"filters": 8}], [[], "x"], "a mapping"),
        (PREPARE["export"], [["volumes", "slices"]], [["cubes"], "slices"], "a list of values from ['volumes'"),
        (PREPARE["patch_ratio"], [[1.0, 0.0]], [[-1.0, 1.0]], "a list of numbers >= 0"),
        (EVALUATE["connectivity"], [1, 3], [0, 4], "one of [1, 2, 3]"),
    ],
)
def test_setting_check_accepts_and_refuses(setting: Setting, good, bad, words):
    for value in [None, *good]:
        setting.check("key", value)
    for value in bad:
        with pytest.raises(ValueError, match=r"setting 'key' must be " + __import__("re").escape(words)):
            setting.check("key", value)


def test_help_text_names_the_default():
    assert TRAINING["lr"].help_text() == "initial learning rate (default: 0.003)"
    assert TRAINING["grad_clip"].help_text().endswith("(default: off)")
    assert PREPARE["split"].help_text() == "patient-level split fractions (default: 0.8 0.2 0)"
    assert TRAINING["mixed_precision"].help_text().endswith("(default: off)")

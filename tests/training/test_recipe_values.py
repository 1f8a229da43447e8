"""recipe.json's reference recipe: the official code's values on file, the Keras values derived."""

import copy
import dataclasses
import json
import os
from fractions import Fraction

import pytest

from keras_mmfusion.training import protocol

RECIPE_FILE = os.path.join(os.path.dirname(protocol.__file__), "recipe.json")

# The official code's ROSMAP values, and its loss: 1.5**3 cross-entropy + (1.5**2, 1.5, 1)
# times the gate and confidence losses of views 1, 2 and 3 + 20 times the Jacobian penalty.
LOSS_SCALE = Fraction("3.375")
WEIGHT_DECAY, CLIPNORM, JACOBIAN_WEIGHT, VIEW_LOSS_WEIGHT = Fraction("1e-4"), Fraction(30), Fraction(20), Fraction(1)
VIEW_LOSS_SCALES = (Fraction("2.25"), Fraction("1.5"), Fraction(1))


def _exact(value):
    """``value`` divided by the loss scale, computed exactly and rounded once to a float,
    within a relative 1e-12."""
    return pytest.approx(float(value / LOSS_SCALE), rel=1e-12, abs=0)


def _reference():
    with open(RECIPE_FILE) as f:
        return json.load(f)["reference"]


def test_the_file_holds_the_official_values_and_the_loss_scale():
    reference = _reference()
    assert reference["loss_scale"] == 3.375 == 1.5**3
    assert reference["view_loss_scales"] == [2.25, 1.5, 1.0] == [1.5**2, 1.5, 1.0]
    assert reference["weight_decay"] == 1e-4
    assert reference["clipnorm"] == 30
    assert reference["fusion_options"]["jacobian_weight"] == 20
    assert reference["model_options"] == {"gate_weight": 1.0, "confidence_weight": 1.0}


def test_round_trip_gives_the_official_values_divided_by_the_loss_scale():
    view_weight = _exact(VIEW_LOSS_WEIGHT * sum(VIEW_LOSS_SCALES) / len(VIEW_LOSS_SCALES))
    # Every entry of the derived settings: the scaled ones against the exact quotients,
    # the others exactly as recipe.json holds them.
    expected = {
        "units": 300,
        "dropout": 0.5,
        "lr": 0.0001,
        "batch_size": 256,
        "epochs": 1000,
        "patience": 0,
        "standardize": True,
        "scaling": "min_max",
        "weight_decay": _exact(WEIGHT_DECAY),
        "clipnorm": _exact(CLIPNORM),
        "lr_decay_every": 500,
        "lr_decay_factor": 0.2,
        "model_options": {"gate_weight": view_weight, "confidence_weight": view_weight},
        "fusion_options": {
            "jacobian_weight": _exact(JACOBIAN_WEIGHT),
            "num_groups": 4,
            "stop_mode": "abs",
            "max_iter": 30,
            "tol": 0.001,
            "kernel_initializer": {
                "class_name": "VarianceScaling",
                "config": {"scale": 0.3333333333333333, "mode": "fan_in", "distribution": "uniform"},
            },
        },
    }
    derived = protocol.scaled_reference_recipe(_reference())
    assert derived == expected
    assert list(derived) == list(expected)
    assert dataclasses.asdict(protocol.REFERENCE_RECIPE) == dataclasses.asdict(protocol.Settings(**derived))


def test_the_derived_values_to_six_significant_digits():
    recipe = protocol.REFERENCE_RECIPE
    values = (recipe.weight_decay, recipe.clipnorm, recipe.fusion_options["jacobian_weight"],
              recipe.model_options["gate_weight"], recipe.model_options["confidence_weight"])
    assert [f"{v:.6g}" for v in values] == ["2.96296e-05", "8.88889", "5.92593", "0.469136", "0.469136"]


def test_the_narrow_recipe_is_the_derived_reference_with_a_64_wide_state_and_60_steps():
    reference, narrow = protocol.REFERENCE_RECIPE, protocol.REFERENCE_NARROW_RECIPE
    assert narrow.fusion_options == {**reference.fusion_options, "units": 64, "max_iter": 60}
    assert dataclasses.replace(narrow, fusion_options=reference.fusion_options) == reference


def test_deriving_leaves_its_argument_as_it_is():
    reference = _reference()
    original = copy.deepcopy(reference)
    protocol.scaled_reference_recipe(reference)
    assert reference == original


@pytest.mark.parametrize("change", [{"loss_scale": 0}, {"loss_scale": -3.375}, {"view_loss_scales": []}])
def test_a_loss_scale_that_cannot_divide_is_refused(change):
    with pytest.raises(ValueError):
        protocol.scaled_reference_recipe({**_reference(), **change})

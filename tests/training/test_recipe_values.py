"""recipe.json's reference recipe: the official code's values, and the loss they give."""

import dataclasses
import json
import os

import numpy as np
import pytest

from keras_mmfusion.equilibrium import ImplicitAdjoint
from keras_mmfusion.layers import training_labels
from keras_mmfusion.training import Splits, build_model, protocol

RECIPE_FILE = os.path.join(os.path.dirname(protocol.__file__), "recipe.json")


def _reference():
    with open(RECIPE_FILE) as f:
        return json.load(f)["reference"]


def test_the_file_holds_the_official_values():
    reference = _reference()
    # The official loss multiplies its running total by 1.5 once per view: 1.5**3
    # cross-entropy + (1.5**2, 1.5, 1) x the views' gate and confidence losses.
    assert reference["loss_weight"] == 3.375 == 1.5**3
    # PyTorch's xavier_normal_ (untruncated, std sqrt(2 / (fan_in + fan_out))) for the
    # gates, encoders, confidence heads and classifier.
    xavier_normal = {"class_name": "VarianceScaling",
                     "config": {"scale": 1.0, "mode": "fan_avg", "distribution": "untruncated_normal"}}
    assert reference["model_options"] == {"gate_weight": [2.25, 1.5, 1.0], "confidence_weight": [2.25, 1.5, 1.0],
                                          "kernel_initializer": xavier_normal}
    assert (reference["weight_decay"], reference["clipnorm"], reference["adam_epsilon"]) == (1e-4, 30, 1e-8)
    assert reference["torch_epsilon"] is True
    fusion = reference["fusion_options"]
    assert (fusion["jacobian_weight"], fusion["jacobian_probes"], fusion["num_groups"]) == (20, 2, 4)
    assert (fusion["solver"], fusion["max_iter"], fusion["tol"], fusion["stop_mode"]) == (
        "reference_anderson", 30, 1e-5, "abs")
    assert fusion["injection"] == "sum"
    assert fusion["bias_initializer"] == fusion["kernel_initializer"]  # PyTorch's Linear biases
    assert fusion["backward"]["config"] == {"max_iter": 31, "tol": 1e-5, "stop_mode": "rel", "start": "zero",
                                            "output": "update"}


def test_the_recipe_is_the_file_as_it_is():
    reference = _reference()
    recipe = protocol.REFERENCE_RECIPE
    assert dataclasses.asdict(recipe) == dataclasses.asdict(protocol.Settings(**reference))


def test_the_reference_classifier_trains_on_the_official_loss():
    """The training loss of the recipe's model is 3.375 CE + sum_i w_i (gate_i + conf_i) +
    20 x the Jacobian penalty, each term read from the layers themselves."""
    recipe = protocol.REFERENCE_RECIPE
    rng = np.random.default_rng(0)
    xs = [rng.uniform(size=(12, 5)) for _ in range(3)]
    labels = np.arange(12) % 2
    settings = dataclasses.replace(recipe, units=8, dropout=0.0)
    model = build_model("reference", Splits((xs, labels), (xs, labels), 2, "toy"), settings)
    from keras_mmfusion.training import compile_classifier

    compile_classifier(model, loss_weight=settings.loss_weight)
    with training_labels(labels):
        probabilities = model(xs, training=True)
        losses = [float(v) for v in model.losses]
    ce = -np.mean(np.log(np.asarray(probabilities)[np.arange(12), labels]))
    gates = [float(model.get_layer(f"feature_gate_{i}").sparsity.result()) for i in range(3)]
    heads = [float(model.get_layer(f"confidence_{i}").head_loss.result()) for i in range(3)]
    jacobian = float(model.get_layer("deq_fusion").jacobian_metric.result())
    expected = 3.375 * ce + sum(w * (g + h) for w, g, h in zip([2.25, 1.5, 1.0], gates, heads)) + 20 * jacobian
    assert 3.375 * ce + sum(losses) == pytest.approx(expected, rel=1e-5)
    assert isinstance(model.get_layer("deq_fusion").adjoint, ImplicitAdjoint)


def test_the_narrow_recipe_is_the_reference_with_a_64_wide_state_and_60_steps():
    reference, narrow = protocol.REFERENCE_RECIPE, protocol.REFERENCE_NARROW_RECIPE
    assert narrow.fusion_options == {**reference.fusion_options, "units": 64, "max_iter": 60}
    assert dataclasses.replace(narrow, fusion_options=reference.fusion_options) == reference

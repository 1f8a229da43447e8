"""The honest training protocol: splits, selection on validation only, multi-seed runs, scores.

The ``mmfusion`` command, the examples and the benchmarks run their trials through
:func:`run_trial`: a stratified validation split carved from the training data, early
stopping and best-epoch selection on validation only, and one evaluation of the test
split at the end. The library itself (layers, models, export) does not depend on it.
"""

from keras_mmfusion.training.fitting import build_before_tracing, compile_classifier, fit_classifier
from keras_mmfusion.training.optimizers import CoupledDecayAdam
from keras_mmfusion.training.processes import in_processes
from keras_mmfusion.training.reproducibility import fixed_summation_order
from keras_mmfusion.training.protocol import (
    RECIPE,
    REFERENCE_NARROW_RECIPE,
    REFERENCE_RECIPE,
    Settings,
    Splits,
    build_model,
    converged_keys,
    converged_last_10,
    fit_options,
    model_inputs,
    load_splits,
    run_trial,
    select_views,
    summarise,
    units_for,
)
from keras_mmfusion.training.scores import classification_metrics, headline_metrics

__all__ = [
    "CoupledDecayAdam",
    "RECIPE",
    "REFERENCE_NARROW_RECIPE",
    "REFERENCE_RECIPE",
    "Settings",
    "Splits",
    "build_before_tracing",
    "build_model",
    "fixed_summation_order",
    "in_processes",
    "model_inputs",
    "classification_metrics",
    "compile_classifier",
    "converged_keys",
    "converged_last_10",
    "fit_classifier",
    "fit_options",
    "headline_metrics",
    "load_splits",
    "run_trial",
    "select_views",
    "summarise",
    "units_for",
]

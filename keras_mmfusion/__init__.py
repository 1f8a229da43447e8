"""keras_mmfusion: Keras 3 layers that fuse several input modalities into one representation."""

import keras as _keras

if _keras.backend.backend() != "tensorflow":
    raise ImportError(
        f"keras_mmfusion runs on Keras's TensorFlow backend, but Keras is set to the "
        f"'{_keras.backend.backend()}' backend. Set the environment variable KERAS_BACKEND=tensorflow "
        "(or \"backend\": \"tensorflow\" in ~/.keras/keras.json) before importing Keras."
    )

from keras_mmfusion import datasets, equilibrium, layers, models
from keras_mmfusion.datasets import make_synthetic
from keras_mmfusion.equilibrium import fixed_point_solve
from keras_mmfusion.layers import (
    ConcatFusion,
    ConfidenceHead,
    DEQFusion,
    DenseFusion,
    DynamicFusion,
    ExactGroupNormalization,
    FeatureGate,
    FusionLayer,
    GatedFusion,
    LowRankTensorFusion,
    ModalityDropout,
    PropagateNonFinite,
    SumFusion,
    TensorFusion,
    WeightNormalizedDense,
    ZeroAbsent,
)
from keras_mmfusion.callbacks import RoutedObjective, TemperatureSchedule
from keras_mmfusion.layer_statistics import RoutingMetric, SolverStatsMetric

__version__ = "0.1.0"

__all__ = [
    "ConcatFusion",
    "ConfidenceHead",
    "DEQFusion",
    "DenseFusion",
    "DynamicFusion",
    "ExactGroupNormalization",
    "FeatureGate",
    "PropagateNonFinite",
    "RoutedObjective",
    "TemperatureSchedule",
    "FusionLayer",
    "GatedFusion",
    "LowRankTensorFusion",
    "ModalityDropout",
    "SumFusion",
    "TensorFusion",
    "WeightNormalizedDense",
    "ZeroAbsent",
    "RoutingMetric",
    "SolverStatsMetric",
    "datasets",
    "equilibrium",
    "fixed_point_solve",
    "layers",
    "make_synthetic",
    "models",
]

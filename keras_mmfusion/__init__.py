"""keras_mmfusion: Keras 3 layers that fuse several input modalities into one representation."""

from keras_mmfusion import datasets, equilibrium, layers
from keras_mmfusion.datasets import make_synthetic
from keras_mmfusion.equilibrium import fixed_point_solve
from keras_mmfusion.layers import DEQFusion
from keras_mmfusion.metrics import SolverStatsMetric

__version__ = "0.1.0"

__all__ = [
    "DEQFusion",
    "SolverStatsMetric",
    "datasets",
    "equilibrium",
    "fixed_point_solve",
    "layers",
    "make_synthetic",
]

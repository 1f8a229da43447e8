"""Datasets: the built-in synthetic default."""

from keras_mmfusion.datasets.synthetic import make_synthetic

__all__ = ["make_synthetic"]

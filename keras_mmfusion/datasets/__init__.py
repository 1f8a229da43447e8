"""Datasets: the built-in synthetic default and readers for real multimodal data (CSV, NPY,
MATLAB ``.mat``)."""

from keras_mmfusion.datasets.mat import load_mat
from keras_mmfusion.datasets.mogonet import load_brca, load_mogonet, load_rosmap, mogonet_folder
from keras_mmfusion.datasets.multiomics import find_views, load_multiomics, stratified_split
from keras_mmfusion.datasets.synthetic import make_synthetic
from keras_mmfusion.datasets.tabular import DataError, load_modalities, read_labels, read_matrix

__all__ = [
    "DataError",
    "find_views",
    "load_brca",
    "load_mat",
    "load_mogonet",
    "load_rosmap",
    "mogonet_folder",
    "load_modalities",
    "load_multiomics",
    "make_synthetic",
    "read_labels",
    "read_matrix",
    "stratified_split",
]

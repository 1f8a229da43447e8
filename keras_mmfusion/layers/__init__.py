"""Fusion layers. Each is called on a list of ``(batch, d_i)`` modality tensors."""

from keras_mmfusion.layers.basic import (
    ConcatFusion,
    GatedFusion,
    LowRankTensorFusion,
    SumFusion,
    TensorFusion,
)
from keras_mmfusion.layers.deq_fusion import DEQFusion
from keras_mmfusion.layers.dense_fusion import DenseFusion
from keras_mmfusion.layers.dynamic import DynamicFusion
from keras_mmfusion.layers.fusion_layer import FusionLayer

__all__ = [
    "ConcatFusion",
    "DEQFusion",
    "DenseFusion",
    "DynamicFusion",
    "FusionLayer",
    "GatedFusion",
    "LowRankTensorFusion",
    "SumFusion",
    "TensorFusion",
]

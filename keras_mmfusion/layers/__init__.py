"""Fusion layers. Each is called on a list of ``(batch, d_i)`` modality tensors."""

from keras_mmfusion.layers.basic import (
    ConcatFusion,
    GatedFusion,
    LowRankTensorFusion,
    SumFusion,
    TensorFusion,
)
from keras_mmfusion.layers.confidence import ConfidenceHead, training_labels
from keras_mmfusion.layers.deq_fusion import DEQFusion
from keras_mmfusion.layers.dense_fusion import DenseFusion
from keras_mmfusion.layers.dynamic import DynamicFusion
from keras_mmfusion.layers.feature_gate import FeatureGate
from keras_mmfusion.layers.fusion_layer import FusionLayer
from keras_mmfusion.layers.modality_dropout import ModalityDropout
from keras_mmfusion.layers.modality_mask import ZeroAbsent
from keras_mmfusion.layers.non_finite import PropagateNonFinite
from keras_mmfusion.layers.normalization import ExactGroupNormalization
from keras_mmfusion.layers.weight_normalization import WeightNormalizedDense

__all__ = [
    "ConcatFusion",
    "ConfidenceHead",
    "DEQFusion",
    "DenseFusion",
    "DynamicFusion",
    "ExactGroupNormalization",
    "FeatureGate",
    "FusionLayer",
    "GatedFusion",
    "LowRankTensorFusion",
    "ModalityDropout",
    "PropagateNonFinite",
    "SumFusion",
    "TensorFusion",
    "WeightNormalizedDense",
    "ZeroAbsent",
    "training_labels",
]

"""Fusion layers. Each is called on a list of ``(batch, d_i)`` modality tensors."""

from keras_mmfusion.layers.deq_fusion import DEQFusion

__all__ = ["DEQFusion"]

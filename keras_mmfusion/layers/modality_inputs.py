"""Validation of the list-of-modalities inputs every fusion layer is called on, and of
the modality mask that may come with them."""

import keras
from keras import ops


def _describe(value):
    shape = getattr(value, "shape", None)
    if shape is not None:
        return f"a single tensor of shape {tuple(shape)}"
    return f"a {type(value).__name__}"


def _is_shape(value):
    return isinstance(value, (tuple, list)) and all(
        d is None or isinstance(d, int) for d in value
    )


def modality_widths(layer_name, input_shape, min_modalities=2):
    """Check the build-time shapes of a list of ``(batch, d_i)`` inputs.

    Args:
        layer_name: the calling layer's name, for the error message.
        input_shape: what Keras passes to ``build``: a list of shapes.
        min_modalities: the smallest number of modalities accepted.

    Returns:
        The list of widths ``d_i``.

    Raises:
        ValueError: naming the offending input and the expected shape.
    """
    if _is_shape(input_shape) or not isinstance(input_shape, (list, tuple)):
        raise ValueError(
            f"{layer_name} must be called on a list of at least {min_modalities} modality "
            f"tensors of shape (batch, d_i); got a single input of shape {input_shape}."
        )
    shapes = [tuple(s) for s in input_shape]
    if len(shapes) < min_modalities:
        raise ValueError(
            f"{layer_name} must be called on a list of at least {min_modalities} modality "
            f"tensors of shape (batch, d_i); got {len(shapes)}."
        )
    widths = []
    batch = None
    for i, shape in enumerate(shapes):
        if len(shape) != 2:
            raise ValueError(
                f"{layer_name}: input {i} must have rank 2, shape (batch, d_{i}); "
                f"got rank {len(shape)}, shape {shape}."
            )
        if shape[-1] is None:
            raise ValueError(
                f"{layer_name}: input {i} must have a known width d_{i}; got shape {shape}."
            )
        if shape[0] is not None:
            if batch is not None and shape[0] != batch[1]:
                raise ValueError(
                    f"{layer_name}: input {i} has batch size {shape[0]} but input "
                    f"{batch[0]} has batch size {batch[1]}; all modalities must share "
                    "the batch dimension."
                )
            batch = batch or (i, shape[0])
        widths.append(shape[-1])
    return widths


def check_modalities(layer_name, inputs, widths):
    """Check the tensors a built layer is called on against its build-time widths."""
    if not isinstance(inputs, (list, tuple)):
        raise ValueError(
            f"{layer_name} must be called on a list of {len(widths)} modality tensors; "
            f"got {_describe(inputs)}."
        )
    if len(inputs) != len(widths):
        raise ValueError(
            f"{layer_name} was built for {len(widths)} modalities and called on "
            f"{len(inputs)}."
        )
    shapes = [tuple(x.shape) for x in inputs]
    modality_widths(layer_name, shapes, min_modalities=len(widths))
    for i, (shape, width) in enumerate(zip(shapes, widths)):
        if shape[-1] != width:
            raise ValueError(
                f"{layer_name}: input {i} must have shape (batch, {width}) as at build "
                f"time; got {shape}."
            )


def check_modality_mask(label, mask, num_modalities, batch_size=None):
    """Check ``mask`` against the layer's modalities; returns it as a bool tensor.

    Raises:
        ValueError: naming the problem: not boolean, not rank 2, the wrong number of
            columns, or a batch size different from the inputs'.
    """
    mask = ops.convert_to_tensor(mask)
    if keras.backend.standardize_dtype(mask.dtype) != "bool":
        raise ValueError(
            f"{label}: modality_mask must be boolean, (batch, {num_modalities}) with True "
            f"where a modality is present; got dtype {mask.dtype}. Cast it, e.g. "
            "keras.ops.cast(mask, 'bool')."
        )
    shape = tuple(mask.shape)
    if len(shape) != 2 or (shape[1] is not None and shape[1] != num_modalities):
        raise ValueError(
            f"{label}: modality_mask must have shape (batch, {num_modalities}), one column "
            f"per modality; got shape {shape}."
        )
    if batch_size is not None and shape[0] is not None and shape[0] != batch_size:
        raise ValueError(
            f"{label}: modality_mask has batch size {shape[0]} but the inputs have "
            f"batch size {batch_size}."
        )
    return mask

"""A synthetic multimodal classification task that needs cross-modal interactions."""

import numpy as np
import tensorflow as tf

from keras_mmfusion._checks import check_int

# Norm of each class prototype. The per-feature noise has standard deviation ``noise``,
# so at noise=1 a modality's own latent code is recovered about 98% of the time.
_PROTOTYPE_NORM = 3.0


def make_synthetic(
    num_samples=2048,
    num_modalities=3,
    widths=32,
    num_classes=2,
    noise=1.0,
    easy_fraction=0.0,
    seed=0,
    as_dataset=False,
    batch_size=None,
    return_easy_mask=False,
):
    """Make a task whose label depends on an interaction across modalities.

    Every sample draws one latent code ``c_i`` in ``{0, ..., num_classes - 1}`` per
    modality, independently and uniformly. Modality ``i`` shows a noisy random
    prototype of its own code, ``x_i = P_i[c_i] + noise * N(0, I)``, and the label is
    ``(c_1 + ... + c_N) mod num_classes`` (parity for two classes).

    The label is independent of any single modality (the other codes are uniform),
    and for two classes it is the parity of the codes, which no linear model on the
    concatenated inputs can represent: solving it requires fusing the modalities
    non-linearly.

    A fraction ``easy_fraction`` of samples is "easy": modality 0 additionally shows a
    prototype of the label itself, so that modality alone decides them. The other
    samples carry no such hint.

    Args:
        num_samples: the number of samples.
        num_modalities: the number of modalities N, at least 2.
        widths: the width of every modality (an int) or one width per modality.
        num_classes: the number of classes, at least 2.
        noise: the standard deviation of the per-feature Gaussian noise.
        easy_fraction: the fraction of samples that modality 0 alone decides, in [0, 1].
        seed: the seed; the same arguments and seed give the same data.
        as_dataset: return a ``tf.data.Dataset`` of ``(tuple_of_modalities, label)``.
        batch_size: batch the dataset (only with ``as_dataset``).
        return_easy_mask: also return the boolean mask of easy samples.

    Returns:
        ``(inputs, labels)`` with ``inputs`` a list of float32 arrays ``(num_samples,
        d_i)`` and ``labels`` int32 ``(num_samples,)``; or the dataset. With
        ``return_easy_mask``, a third element: the easy-sample mask.
    """
    check_int("num_modalities", num_modalities, minimum=2)
    check_int("num_classes", num_classes, minimum=2)
    check_int("num_samples", num_samples)
    if isinstance(widths, int) and not isinstance(widths, bool):
        widths = [widths] * num_modalities
    widths = list(widths)
    if len(widths) != num_modalities or not all(
        isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in widths
    ):
        raise ValueError(
            f"widths must be a positive int or {num_modalities} positive ints, got {widths!r}."
        )
    if not (isinstance(noise, (int, float)) and noise >= 0):
        raise ValueError(f"noise must be a number >= 0, got {noise!r}.")
    if not (isinstance(easy_fraction, (int, float)) and 0 <= easy_fraction <= 1):
        raise ValueError(f"easy_fraction must be in [0, 1], got {easy_fraction!r}.")
    if batch_size is not None and not as_dataset:
        raise ValueError("batch_size is only used with as_dataset=True.")

    rng = np.random.default_rng(seed)

    def prototypes(width):
        p = rng.normal(size=(num_classes, width))
        return _PROTOTYPE_NORM * p / np.linalg.norm(p, axis=1, keepdims=True)

    codes = rng.integers(0, num_classes, size=(num_samples, num_modalities))
    labels = codes.sum(axis=1) % num_classes
    inputs = []
    for i, width in enumerate(widths):
        signal = prototypes(width)[codes[:, i]]
        inputs.append(signal + noise * rng.normal(size=(num_samples, width)))
    easy = rng.random(num_samples) < easy_fraction
    inputs[0] = inputs[0] + easy[:, None] * prototypes(widths[0])[labels]

    inputs = [x.astype("float32") for x in inputs]
    labels = labels.astype("int32")
    if as_dataset:
        data = tf.data.Dataset.from_tensor_slices((tuple(inputs), labels))
        if batch_size is not None:
            data = data.batch(batch_size)
        return (data, easy) if return_easy_mask else data
    return (inputs, labels, easy) if return_easy_mask else (inputs, labels)

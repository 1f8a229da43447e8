"""Model builders and data shared by the layer tests."""

import fcntl
import os

import numpy as np
import keras

import keras_mmfusion as mmf
from keras_mmfusion.training import build_before_tracing


def random_inputs(batch=5, widths=(8, 12, 8), seed=0, dtype="float32"):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(batch, w)).astype(dtype) for w in widths]


def fusion_classifier(fusion, widths, units=16, num_classes=2):
    """The standard encoder -> fusion -> MLP head classifier used by the examples."""
    inputs = [keras.Input((w,), name=f"modality_{i}") for i, w in enumerate(widths)]
    encoded = [keras.layers.Dense(units, activation="relu")(x) for x in inputs]
    hidden = keras.layers.Dense(units, activation="relu")(fusion(encoded))
    outputs = keras.layers.Dense(num_classes, activation="softmax")(hidden)
    return keras.Model(inputs, outputs)


def linear_classifier(widths, num_classes=2):
    inputs = [keras.Input((w,)) for w in widths]
    concat = keras.layers.Concatenate()(inputs)
    return keras.Model(inputs, keras.layers.Dense(num_classes, activation="softmax")(concat))


def synthetic_split(widths=(8, 8, 8), noise=0.7, seed=4, train=1200, test=400):
    """``(widths, (x, y), (x_test, y_test))`` from the synthetic interaction task."""
    inputs, labels = mmf.make_synthetic(train + test, widths=list(widths), noise=noise, seed=seed)
    return (
        widths,
        ([x[:train] for x in inputs], labels[:train]),
        ([x[train:] for x in inputs], labels[train:]),
    )


def fit_and_score(model, train, test, epochs=20, batch_size=64, lr=3e-3, **compile_kwargs):
    """Train with ``model.fit`` and return the test accuracy."""
    model.compile(
        keras.optimizers.Adam(lr), "sparse_categorical_crossentropy", metrics=["accuracy"], **compile_kwargs
    )
    build_before_tracing(model, *train)
    model.fit(*train, epochs=epochs, batch_size=batch_size, verbose=0)
    return model.evaluate(*test, verbose=0, return_dict=True)["accuracy"]


# Inputs every fusion layer must refuse, with the message its error must contain.
BAD_FUSION_INPUTS = [
    (np.ones((4, 8), "float32"), "must be called on a list"),
    ([np.ones((4, 8), "float32")], "at least 2 modality tensors"),
    ([np.ones((4, 8), "float32"), np.ones((4, 2, 8), "float32")], r"input 1 must have rank 2"),
    ([np.ones((4, 8), "float32"), np.ones((3, 8), "float32")], r"input 1 has batch size 3 but input 0 has batch size 4"),
]


def fit_save_reload(model, x, path):
    """Train ``model`` one epoch on ``x`` with alternating labels, save it to ``path`` and
    load it back in safe mode; returns the loaded model."""
    model.compile("adam", "sparse_categorical_crossentropy")
    labels = np.arange(len(x[0])) % 2
    build_before_tracing(model, x, labels)
    model.fit(x, labels, epochs=1, verbose=0)
    model.save(path)
    return keras.saving.load_model(path, safe_mode=True)


def made_once(tmp_path_factory, name, make):
    """The path of the file ``name`` that ``make(path)`` writes, made once per test run
    and shared by every test module that asks for it.

    Under pytest-xdist the workers of one run share the parent of their base
    temporary folders, so a lock there lets the first worker write the file and the
    others wait for it (the pattern of pytest-xdist's documentation); without xdist
    the run's own base folder is used. ``make`` writes to a temporary name, renamed
    to ``name`` once complete.
    """
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    path = root / name
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.exists():
            stem, dot, suffix = name.rpartition(".")
            written = root / (f"{stem}.writing.{suffix}" if dot else f"{name}.writing")
            make(written)
            os.replace(written, path)
    return path


def trained_once(tmp_path_factory, name, train):
    """A model that ``train()`` returns, trained once per test run (see :func:`made_once`)
    and loaded from a ``.keras`` file (in safe mode) by every test module that asks for it."""
    path = made_once(tmp_path_factory, f"{name}.keras", lambda path: train().save(path))
    return keras.saving.load_model(path, safe_mode=True)


def assert_weight_gradients_match_finite_differences(value, weights, grads, rng, h, rtol, atol=0.0):
    """For every weight, the gradient ``grads[i]`` of the scalar ``value()`` along a random
    direction against a central difference of step ``h``; a ``None`` gradient counts as 0."""
    for weight, grad in zip(weights, grads):
        start = weight.numpy()
        direction = rng.normal(size=start.shape)
        weight.assign(start + h * direction)
        up = float(value())
        weight.assign(start - h * direction)
        down = float(value())
        weight.assign(start)
        numeric = (up - down) / (2 * h)
        analytic = 0.0 if grad is None else float(np.sum(np.asarray(grad) * direction))
        assert abs(analytic - numeric) <= rtol * abs(numeric) + atol, (weight.path, analytic, numeric)

"""One training step and one prediction, on one device and under MirroredStrategy over two
logical CPUs, for each kind named on the command line; prints a JSON report keyed by kind.
Run as a script: the logical devices must be set up before TensorFlow initialises. All
kinds share one strategy: a second MirroredStrategy in one process reuses the first one's
collective instance keys, and its all-reduces then fail on a shape mismatch."""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import tensorflow as tf  # noqa: E402

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_mmfusion as mmf  # noqa: E402
from keras_mmfusion.training import build_before_tracing  # noqa: E402

WIDTHS = [6, 10, 8]


def build(kind, masked):
    keras.utils.set_random_seed(0)
    if kind == "reference":
        # Gates, confidence heads (which read each replica's labels) and DEQ fusion, with
        # their add_loss terms. No dropout: each replica would draw its masks for its own
        # share of the batch, and no Jacobian penalty, for the same reason (below).
        model = mmf.models.build_reference_classifier(WIDTHS, 2, units=8, dropout=0.0,
                                                      fusion_options={"jacobian_weight": 0.0})
        model.compile(keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy")
        return model
    if kind == "deq":
        # The Jacobian penalty's Hutchinson probes are random draws of the local batch's
        # shape, so each replica draws different ones than one device would: the penalty
        # is left out of the comparison of weights.
        fusion = mmf.DEQFusion(8, max_iter=30, tol=1e-5, jacobian_weight=0.0, name="fusion")
    else:
        # DynMM with its routing-cost term (make_fusion's cost_weight=0.05): an add_loss
        # term whose gradient a replica loses if the forward pass synchronises replicas.
        fusion = mmf.models.make_fusion(kind, 8, num_modalities=len(WIDTHS))
    model = mmf.models.build_classifier(fusion, WIDTHS, 2, encoder_units=8, head_units=8, modality_mask=masked)
    model.compile(keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy")
    return model


def run(model, x, y, masked):
    # The single-device step is then traced once; for the mirrored model this does nothing,
    # as Keras builds it itself under the strategy.
    build_before_tracing(model, x, y)
    if masked:
        # Keras's fit and evaluate average the first distributed batch over the replicas
        # to build the model, which fails on a boolean input; train_on_batch does not.
        logs = {k: float(v) for k, v in model.train_on_batch(x, y, return_dict=True).items()}
    else:
        history = model.fit(x, y, batch_size=64, epochs=1, shuffle=False, verbose=0).history
        logs = {k: float(v[-1]) for k, v in history.items()}
    model.predict(x, batch_size=64, verbose=0)
    fusion = next(layer for layer in model.layers if "fusion" in layer.name)
    report = {"weights": [w.tolist() for w in model.get_weights()], "logs": logs}
    if hasattr(fusion, "last_stats"):
        report["last_stats"] = {k: float(v) for k, v in fusion.last_stats.items()}
    if hasattr(fusion, "last_routing"):
        report["last_routing"] = np.asarray(fusion.last_routing).tolist()
    return report


def compare(kind, masked, strategy):
    """``{"single": report, "mirrored": report}`` for ``kind``; with ``masked`` the classifier
    takes a modality_mask input, fed with modalities absent (NaN placeholders)."""
    x, y = mmf.make_synthetic(64, num_modalities=3, widths=WIDTHS, noise=0.5, seed=0)
    if masked:
        rng = np.random.default_rng(0)
        mask = rng.random((64, 3)) < 0.6
        mask[np.arange(64), rng.integers(0, 3, 64)] = True
        x = [np.where(mask[:, i : i + 1], a, np.nan).astype("float32") for i, a in enumerate(x)] + [mask]
    single = run(build(kind, masked), x, y, masked)
    with strategy.scope():
        mirrored = build(kind, masked)
    return {"single": single, "mirrored": run(mirrored, x, y, masked)}


# Each argument: "<fusion>" or "<fusion>-masked".
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
reports = {}
for name in sys.argv[1:]:
    kind, _, masked = name.partition("-")
    reports[name] = compare(kind, bool(masked), strategy)
    keras.backend.clear_session()
print(json.dumps(reports))

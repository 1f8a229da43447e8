"""A sample with a NaN or an infinity in any view comes out of the package's classifiers as
NaN probabilities with oneDNN's CPU kernels on, as TensorFlow runs by default on x86.

The test processes run TensorFlow's own kernels (conftest.py), which carry NaN through a
``Dense`` layer's ReLU; oneDNN's fused ``MatMul + BiasAdd + Relu`` kernel maps it to 0,
the case ``PropagateNonFinite`` exists for. So the check runs in a subprocess with
oneDNN on.
"""

import json
import os
import subprocess
import sys

SCRIPT = """
import json
import keras
import numpy as np
import keras_mmfusion as mmf

widths = [6, 5, 4]
x, y = mmf.make_synthetic(128, num_modalities=3, widths=widths, noise=0.5, seed=0)
x = [a * 3.0 + 1.0 for a in x]
bad = [a[:4].copy() for a in x]
bad[0][0, 0], bad[1][1, 2], bad[2][2, 1] = np.nan, np.inf, -np.inf
keras.utils.set_random_seed(0)
dense = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="relu")])
report = {"dense_relu_keeps_nan": bool(np.isnan(dense.predict(bad[0][:1], verbose=0)).any())}
models = {
    "standard": mmf.models.build_classifier(mmf.models.make_fusion("concat", 8), widths, 2, encoder_units=8,
                                            head_units=8, standardize_with=x),
    "reference": mmf.models.build_reference_classifier(widths, 2, units=8, standardize_with=x),
}
# The standard classifier trained; the reference classifier at its initial weights:
# training changes its weights, not the layers a NaN passes through, and tracing its
# training step would take most of the test's time.
models["standard"].compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy")
models["standard"].fit(x, y, epochs=2, batch_size=32, verbose=0)
for name, model in models.items():
    p = model.predict(bad, verbose=0)
    report[name] = {"nan": np.isnan(p).all(axis=1).tolist(), "finite": np.isfinite(p).all(axis=1).tolist()}
print(json.dumps(report))
"""


def test_non_finite_samples_come_out_nan_with_onednn_kernels():
    env = {**os.environ, "TF_ENABLE_ONEDNN_OPTS": "1", "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    # The kernels the check needs: a plain Dense + ReLU loses the NaN under oneDNN.
    assert not report["dense_relu_keeps_nan"], ("a Dense + ReLU kept the NaN: oneDNN's fused kernel did not run, "
                                                  "and the check would prove nothing")
    for name in ("standard", "reference"):
        # Samples 0-2 hold a NaN, an infinity and a negative infinity; sample 3 is finite.
        assert report[name] == {"nan": [True, True, True, False], "finite": [False, False, False, True]}, name

"""Train a DEQ-fusion classifier on the built-in synthetic dataset, evaluate it, print
the solver statistics, save it as a .keras file and export it to SavedModel (TF
Serving), TFLite and ONNX, checking each export against Keras.

    python examples/quickstart.py [--epochs N] [--out DIR]
"""

import argparse
import json
import os
import sys

from keras_mmfusion_cli import quiet_tensorflow_import

# TensorFlow's C++ start-up lines are hidden unless --verbose is given (or the
# TF_CPP_MIN_LOG_LEVEL variable is set).
quiet_tensorflow_import(verbose="--verbose" in sys.argv)

import keras  # noqa: E402

import keras_mmfusion as mmf  # noqa: E402
from keras_mmfusion.training import build_before_tracing  # noqa: E402


def build_model(widths, units=32, num_classes=2):
    """Per-modality encoders, DEQ fusion, and an MLP head."""
    inputs = [keras.Input((w,), name=f"modality_{i}") for i, w in enumerate(widths)]
    encoded = [keras.layers.Dense(units, activation="relu", name=f"encoder_{i}")(x) for i, x in enumerate(inputs)]
    fused = mmf.DEQFusion(units=units, name="deq_fusion")(encoded)
    hidden = keras.layers.Dense(units, activation="relu", name="head")(fused)
    outputs = keras.layers.Dense(num_classes, activation="softmax", name="probabilities")(hidden)
    return keras.Model(inputs, outputs, name="deq_fusion_classifier")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--out", default="runs/quickstart")
    parser.add_argument("--verbose", action="store_true", help="also show TensorFlow's C++ log lines")
    args = parser.parse_args()

    widths = (16, 16, 16)
    inputs, labels = mmf.make_synthetic(4000, widths=widths, seed=0)
    train = ([x[:3000] for x in inputs], labels[:3000])
    test = ([x[3000:] for x in inputs], labels[3000:])

    keras.utils.set_random_seed(0)
    model = build_model(widths)
    model.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy", metrics=["accuracy"])
    # Creates the optimizer's and metrics' variables now, so that fit traces the training
    # step once, not twice (docs/guide.md, "Notes on behaviour").
    build_before_tracing(model, *train)
    model.fit(*train, validation_split=0.2, epochs=args.epochs, batch_size=64, verbose=1)

    results = model.evaluate(*test, verbose=0, return_dict=True)
    stats = {k: v.numpy().item() for k, v in model.get_layer("deq_fusion").last_stats.items()}
    print("\nTest metrics:")
    for name, value in results.items():
        print(f"  {name:>18}: {value:.4f}")
    print("Solver statistics of the last forward solve (evaluation) and adjoint solve (training):")
    for name, value in stats.items():
        print(f"  {name:>18}: {value}")

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "model.keras")
    model.save(path)
    print(f"Saved the trained model to {path}")

    from keras_mmfusion import export

    sample = [x[:7] for x in test[0]]
    exports = {
        "saved_model": export.to_saved_model(model, os.path.join(args.out, "serving"), overwrite=True),
        "tflite": export.to_tflite(model, os.path.join(args.out, "model.tflite"), overwrite=True),
        "onnx": export.to_onnx(model, os.path.join(args.out, "model.onnx"), overwrite=True),
    }
    print("Exports, max relative difference from Keras on 7 test samples:")
    checks = {}
    for name, artefact in exports.items():
        checks[name] = export.verify_export(model, artefact, sample)["probabilities"]
        print(f"  {name:>18}: {checks[name]['max_rel']:.2e}  ({artefact})")
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump({"test": results, "solver": stats, "exports": checks}, f, indent=2)


if __name__ == "__main__":
    main()

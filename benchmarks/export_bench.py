"""Export benchmark: file size, single-sample latency and accuracy per deployment format.

    python benchmarks/export_bench.py [--fusion deq] [--epochs 150] [--out benchmarks/results/export_bench.json]

A classifier with the given fusion (DEQFusion by default) is trained on ROSMAP with
the validation protocol of ``keras_mmfusion.experiment`` (synthetic data when ROSMAP is
absent), then exported to SavedModel, TFLite (float32, float16, dynamic-range, int8)
and ONNX. For each artefact: file size, median single-sample latency over repeated
runs after warm-up (TFLite through ai-edge-litert with its default XNNPACK delegate,
ONNX through onnxruntime on CPU, the SavedModel through its serving signature, Keras
through ``model(x, training=False)`` eagerly), and accuracy on the test split.
"""

import argparse
import json
import os
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

from timing import machine as describe_machine, median_seconds  # noqa: E402


def median_ms(fn, repeats, warmup=20):
    return 1e3 * median_seconds(fn, repeats, warmup)


def folder_size(path):
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def runner(path, names):
    """A function running one feed dict through the artefact, returning probabilities."""
    import tensorflow as tf

    if os.path.isdir(path):
        fn = tf.saved_model.load(path).signatures["serving_default"]
        return lambda feed: fn(**{k: tf.constant(v) for k, v in feed.items()})["probabilities"].numpy()
    if path.endswith(".tflite"):
        from ai_edge_litert.interpreter import Interpreter

        signature = Interpreter(model_path=path).get_signature_runner("serving_default")
        return lambda feed: signature(**feed)["probabilities"]
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = os.cpu_count()
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    output = [o.name for o in session.get_outputs() if o.name.startswith("probabilities")]
    return lambda feed: session.run(output, feed)[0]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fusion", default="deq")
    parser.add_argument("--epochs", type=int, default=150)
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--out", default="benchmarks/results/export_bench.json")
    args = parser.parse_args()

    import tensorflow as tf

    from keras_mmfusion import export
    from keras_mmfusion.experiment import Settings, load_splits, rosmap_path, run_trial

    data = "rosmap" if os.path.isdir(rosmap_path()) else "synthetic"
    splits = load_splits(data)
    settings = Settings(units=32, epochs=args.epochs, patience=30)
    model, _, metrics = run_trial(splits, args.fusion, 0, settings)
    names = export.input_names(model)
    test_feed = dict(zip(names, splits.test[0]))
    one = {k: v[:1] for k, v in test_feed.items()}
    representative = ([a[i : i + 1] for a in splits.train[0]] for i in range(len(splits.train[1])))

    rows = {}
    keras_one = [tf.constant(v) for v in one.values()]
    rows["keras (eager)"] = {
        "size_bytes": None,
        "latency_ms": median_ms(lambda: model(keras_one, training=False).numpy(), args.repeats),
        "accuracy": metrics["accuracy"],
    }
    with tempfile.TemporaryDirectory() as tmp:
        artefacts = {"saved_model": export.to_saved_model(model, os.path.join(tmp, "serving"))}
        for quantize in (None, "float16", "dynamic", "int8"):
            label = f"tflite {quantize or 'float32'}"
            try:
                artefacts[label] = export.to_tflite(
                    model, os.path.join(tmp, f"{quantize}.tflite"), quantize=quantize,
                    representative_data=representative if quantize == "int8" else None)
            except export.ExportError as error:
                rows[label] = {"error": str(error).splitlines()[0]}
        artefacts["onnx"] = export.to_onnx(model, os.path.join(tmp, "model.onnx"))
        for label, path in artefacts.items():
            run = runner(path, names)
            probabilities = np.concatenate([run({k: v[i : i + 1] for k, v in test_feed.items()})
                                            for i in range(len(splits.test[1]))])
            rows[label] = {
                "size_bytes": folder_size(path),
                "latency_ms": median_ms(lambda: run(one), args.repeats),
                "accuracy": float(np.mean(probabilities.argmax(-1) == splits.test[1])),
            }
            if path.endswith(".tflite"):
                rows[label]["ops"] = export.tflite_report(path)["ops"]

    machine = describe_machine()
    print(f"machine: {machine}")
    print(f"model: {args.fusion} classifier trained on {data}; single-sample latency, median of {args.repeats} runs")
    print(f"{'format':<18} {'size (KiB)':>11} {'latency ms':>11} {'vs Keras':>9} {'test acc':>9}")
    base = rows["keras (eager)"]["latency_ms"]
    for label, row in rows.items():
        if "error" in row:
            print(f"{label:<18} not produced: {row['error']}")
            continue
        size = "-" if row["size_bytes"] is None else f"{row['size_bytes'] / 1024:.1f}"
        print(f"{label:<18} {size:>11} {row['latency_ms']:>11.3f} {base / row['latency_ms']:>8.1f}x {row['accuracy']:>9.4f}")
    f32 = rows.get("tflite float32", {})
    int8 = rows.get("tflite int8", {})
    if "size_bytes" in int8 and "size_bytes" in f32:
        print(f"int8 / float32 size: {int8['size_bytes'] / f32['size_bytes']:.2f} (target <= 0.35); "
              f"int8 accuracy drop: {100 * (f32['accuracy'] - int8['accuracy']):.1f} points (target <= 1)")
    if "latency_ms" in f32:
        print(f"TFLite float32 vs Keras eager: {base / f32['latency_ms']:.1f}x faster (target >= 5x)")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"machine": machine, "data": data, "fusion": args.fusion, "rows": rows}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

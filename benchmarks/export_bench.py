"""Export benchmark: what each deployment format keeps of the Keras model, and how fast it runs.

    python benchmarks/export_bench.py [--models deq concat dynmm] [--quick]
                                      [--out benchmarks/results/export_bench.json]

Three models, each exported to SavedModel, TFLite (float32, float16, dynamic-range,
int8, and int8 with ``strip_names=True``) and ONNX, all with the solver diagnostics
(``diagnostics=True``):

- ``deq``: the DEQ classifier (layer defaults) trained on ROSMAP as ``mmfusion train``
  trains it: the recipe and validation protocol of ``keras_mmfusion.training``
  (synthetic data when ROSMAP is absent);
- ``concat``: the concatenation baseline, trained the same way;
- ``dynmm``: the DynMM benchmark model of ``examples/dynmm_two_stage.py`` (cost weight
  0.2), on its synthetic data.

int8 calibrates on training samples. For every artefact, on the test split run one sample
at a time (a solve's step count depends on its batch):

- file size, and the ratio to the float32 TFLite file, split into constant data
  (weights, normalisation statistics: "const") and the graph (ops, tensors, names,
  signatures: "graph"), each as a fraction of the float32 file;
- test accuracy, the largest probability difference from Keras, and the number of test
  predictions that differ from Keras's;
- for DEQ, the solver's per-sample step count against Keras's: the largest difference,
  the share of samples within 2 steps, and the share that converged;
- median single-sample latency and batch-64 throughput, each runtime on its own CPU
  defaults (LiteRT with XNNPACK, onnxruntime's CPU provider, the SavedModel's
  signature), against Keras eager and Keras's compiled ``predict_on_batch`` (XLA).
"""

import argparse
import dataclasses
import json
import os
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))

import numpy as np  # noqa: E402

from timing import machine as describe_machine, median_seconds, rosmap_available  # noqa: E402
import report  # noqa: E402

FORMATS = ("saved_model", "tflite float32", "tflite float16", "tflite dynamic", "tflite int8",
           "tflite int8 stripped", "onnx")


def folder_size(path):
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def runner(path):
    """A function running one feed (input name -> array) through the artefact; returns name -> array."""
    import tensorflow as tf

    if os.path.isdir(path):
        fn = tf.saved_model.load(path).signatures["serving_default"]
        return lambda feed: {k: v.numpy() for k, v in fn(**{k: tf.constant(v) for k, v in feed.items()}).items()}
    if path.endswith(".tflite"):
        from ai_edge_litert.interpreter import Interpreter

        signature = Interpreter(model_path=path).get_signature_runner("serving_default")
        return lambda feed: signature(**feed)
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return lambda feed: dict(zip(names, session.run(names, feed)))


def train_models(names, quick):
    """``{name: (model, (train_x, train_y), (test_x, test_y), data name)}``."""
    import keras

    from keras_mmfusion.training import RECIPE, load_splits, run_trial

    models = {}
    data = "rosmap" if rosmap_available() else "synthetic"
    for name in names:
        if name == "dynmm":
            import dynmm_two_stage as recipe

            keras.utils.set_random_seed(0)
            train, val, test = recipe.make_data(0)
            epochs = 5 if quick else 30
            cheap, expensive, inputs = recipe.pretrain_experts(train, val, "mlp", epochs)
            model, _ = recipe.train_gate(cheap, expensive, inputs, train, val, 0.2, epochs)
            models[name] = (model, train, ([a[:512] for a in test[0]], test[1][:512]), "dynmm synthetic")
        else:
            splits = load_splits(data)
            settings = RECIPE if not quick else dataclasses.replace(RECIPE, epochs=20)
            model, _, _ = run_trial(splits, name, 0, settings)
            models[name] = (model, splits.train, splits.test, data)
    return models


def one_at_a_time(run, names, xs):
    outs = [run({n: a[i : i + 1] for n, a in zip(names, xs)}) for i in range(len(xs[0]))]
    return {k: np.concatenate([np.reshape(o[k], (1, -1)) if np.ndim(o[k]) < 2 else o[k] for o in outs])
            for k in outs[0]}


def measure(model, train, test, repeats, tmp):
    import keras
    import tensorflow as tf

    from keras_mmfusion import export

    names = export.input_names(model)
    output = export.output_names(model)[0]
    serve = export.serving_function(model, diagnostics=True)
    reference = one_at_a_time(lambda feed: {k: v.numpy() for k, v in serve(*[tf.constant(feed[n]) for n in names]).items()},
                              names, test[0])
    probabilities = reference[output]
    steps_key = next((k for k in reference if k.endswith("_steps")), None)
    one = [a[:1] for a in test[0]]
    batch = [np.resize(a, (64, a.shape[1])).astype("float32") for a in test[0]]
    rows = {}
    eager_one = [tf.constant(a) for a in one]
    eager_batch = [tf.constant(a) for a in batch]
    rows["keras eager"] = {
        "latency_ms": 1e3 * median_seconds(lambda: model(eager_one, training=False), repeats, warmup=10),
        "batch64_per_s": 64 / median_seconds(lambda: model(eager_batch, training=False), repeats // 4, warmup=5),
    }
    compiled = keras.models.clone_model(model)
    compiled.set_weights(model.get_weights())
    compiled.compile(jit_compile=True)
    rows["keras predict_on_batch (XLA)"] = {
        "latency_ms": 1e3 * median_seconds(lambda: compiled.predict_on_batch(one), repeats, warmup=10),
        "batch64_per_s": 64 / median_seconds(lambda: compiled.predict_on_batch(batch), repeats // 4, warmup=5),
    }
    accuracy = float(np.mean(probabilities.argmax(-1) == test[1]))
    for row in rows.values():
        row["accuracy"] = accuracy
    representative = [[a[i : i + 1] for a in train[0]] for i in range(min(300, len(train[1])))]
    paths = {}
    for fmt in FORMATS:
        target = os.path.join(tmp, fmt.replace(" ", "_"))
        try:
            if fmt == "saved_model":
                paths[fmt] = export.to_saved_model(model, target, diagnostics=True)
            elif fmt == "onnx":
                paths[fmt] = export.to_onnx(model, target + ".onnx", diagnostics=True)
            else:
                quantize = fmt.split()[1]
                paths[fmt] = export.to_tflite(model, target + ".tflite", quantize=None if quantize == "float32" else quantize,
                                              representative_data=representative, diagnostics=True,
                                              strip_names=fmt.endswith("stripped"))
        except export.ExportError as error:
            rows[fmt] = {"error": str(error).splitlines()[0]}
    for fmt, path in paths.items():
        run = runner(path)
        got = one_at_a_time(run, names, test[0])
        key = next(k for k in got if k.startswith(output))
        feed_one = dict(zip(names, one))
        feed_batch = dict(zip(names, batch))
        row = {
            "size_bytes": folder_size(path),
            "accuracy": float(np.mean(got[key].argmax(-1) == test[1])),
            "max_abs_diff": float(np.max(np.abs(got[key] - probabilities))),
            "predictions_changed": int(np.sum(got[key].argmax(-1) != probabilities.argmax(-1))),
            "latency_ms": 1e3 * median_seconds(lambda: run(feed_one), repeats, warmup=10),
            "batch64_per_s": 64 / median_seconds(lambda: run(feed_batch), repeats // 4, warmup=5),
        }
        if steps_key:
            difference = np.abs(got[steps_key].ravel() - reference[steps_key].ravel())
            converged = got[steps_key.replace("_steps", "_converged")].ravel()
            row.update(steps_max_diff=int(difference.max()), steps_within_2=float(np.mean(difference <= 2)),
                       converged=float(np.mean(converged)))
        if path.endswith(".tflite"):
            tflite = export.tflite_report(path)
            row.update(ops=tflite["ops"], operators=tflite["operators"], constant_bytes=tflite["buffer_bytes"])
        rows[fmt] = row
    if steps_key:
        rows["keras eager"]["steps_mean"] = float(np.mean(reference[steps_key]))
        rows["keras eager"]["converged"] = float(np.mean(reference[steps_key.replace("_steps", "_converged")]))
    return rows


def print_table(name, data, rows):
    print(f"\n{name} classifier on {data}")
    print(f"{'format':<28} {'KiB':>8} {'/f32':>5} {'const':>6} {'graph':>6} {'acc':>7} {'max diff':>9} {'changed':>7} {'steps':>15} "
          f"{'conv':>5} {'1-sample ms':>11} {'batch64/s':>10}")
    f32 = rows.get("tflite float32", {}).get("size_bytes")
    for label, row in rows.items():
        if "error" in row:
            print(f"{label:<28} not produced: {row['error']}")
            continue
        size = row.get("size_bytes")
        ratio = size / f32 if size is not None and f32 else None
        if "steps_max_diff" in row:
            steps = f"max {row['steps_max_diff']}, {100 * row['steps_within_2']:.0f}% <=2"
        else:
            steps = f"mean {row['steps_mean']:.1f}" if "steps_mean" in row else "-"
        constant = row.get("constant_bytes")
        cells = [
            "-" if size is None else f"{size / 1024:.1f}",
            "-" if ratio is None else f"{ratio:.2f}",
            "-" if constant is None else f"{constant / f32:.2f}",
            "-" if constant is None else f"{(size - constant) / f32:.2f}",
            f"{row['accuracy']:.4f}",
            f"{row['max_abs_diff']:.1e}" if "max_abs_diff" in row else "-",
            str(row.get("predictions_changed", "-")),
            steps,
            f"{row['converged']:.2f}" if "converged" in row else "-",
            f"{row['latency_ms']:.3f}",
            f"{row['batch64_per_s']:.0f}",
        ]
        widths = (8, 5, 6, 6, 7, 9, 7, 15, 5, 11, 10)
        print(f"{label:<28} " + " ".join(f"{c:>{w}}" for c, w in zip(cells, widths)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    report.add_option(parser)
    parser.add_argument("--models", nargs="+", default=["deq", "concat", "dynmm"], choices=["deq", "concat", "dynmm"])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--quick", action="store_true", help="short training and few repeats (a smoke run)")
    parser.add_argument("--out", default="benchmarks/results/export_bench.json")
    args = parser.parse_args()
    repeats = 20 if args.quick else args.repeats

    results = {}
    with report.unrecorded():  # training logs and the quantizer's messages
        trained = train_models(args.models, args.quick)
    for name, (model, train, test, data) in trained.items():
        with tempfile.TemporaryDirectory() as tmp, report.unrecorded():
            rows = measure(model, train, test, repeats, tmp)
        results[name] = {"data": data, "rows": rows}
        print_table(name, data, rows)

    machine = describe_machine()
    print(f"\nmachine: {machine}; latency: median of {repeats} single-sample calls; throughput: batch 64")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"machine": machine, "repeats": repeats, "models": results}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    report.run(main, "export_bench")

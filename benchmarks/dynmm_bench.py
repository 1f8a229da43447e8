"""DynMM benchmark: compute and time saved by hard routing, and the accuracy it costs.

    python benchmarks/dynmm_bench.py [--expensive mlp|deq] [--quick]
                                     [--out benchmarks/results/dynmm_bench.json]

Synthetic data with 50% easy samples; a cheap expert (MLP on modality 0) and an
expensive one (all modalities through a large fusion head, or DEQFusion), trained with
the two-stage recipe of ``examples/dynmm_two_stage.py``. For each ``cost_weight`` the
gate is trained anew on the same frozen experts. Reported on the test split:

- accuracy of the routed model and of the expensive expert alone;
- MACs per sample: the measured MACs of the chosen expert plus the gate's, averaged
  over the test samples, against the expensive expert alone (no gate);
- wall time of batched inference (batch 256, after warm-up) of the routed model
  against the expensive expert alone, measured two ways, each timing the two
  alternately and giving the cut as one minus the median ratio of their times:
  - per call: one ``tf.function`` call on the first 256 test samples, 300 pairs. Each
    call also pays the runtime's fixed cost of a function call from Python, the same
    for both models;
  - in graph: the whole test split, batch after batch of 256, inside one
    ``tf.function`` (a ``tf.while_loop`` over the batches), 30 pairs; the time per
    batch leaves out the per-call cost, as a serving runtime that batches requests would;
  - both models are traced with an unknown batch size, as a serving signature is. The
    routed model's experts see unknown batch sizes whatever the trace, and the same
    expert traced for a static batch of 256 runs at a different speed (about 9% slower
    for the DEQ expert on this machine's CPU), which would bias the comparison;
- a PNG of accuracy against realised relative cost as ``cost_weight`` varies.
"""

import argparse
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))

import numpy as np  # noqa: E402

from timing import machine as describe_machine, median_ratio, median_seconds  # noqa: E402
import report  # noqa: E402


def median_ms(fn, repeats=50, warmup=5):
    return 1e3 * median_seconds(fn, repeats, warmup)


def batched_in_graph(model, inputs, batch=256):
    """A function running ``model`` over ``inputs`` batch after batch in one graph.

    The samples that do not fill a last batch are left out, so every batch has
    ``batch`` rows. Returns ``(fn, batches)``; ``fn()`` returns the predictions.
    """
    import tensorflow as tf

    batches = len(inputs[0]) // batch
    stacked = [tf.constant(m[: batches * batch].reshape(batches, batch, -1)) for m in inputs]
    signature = [[tf.TensorSpec([None, None, m.shape[-1]], tf.float32) for m in inputs]]

    @tf.function(input_signature=signature)
    def run(stacked):
        def body(k, out):
            return k + 1, out.write(k, model([m[k] for m in stacked], training=False))

        count = tf.shape(stacked[0])[0]
        out = tf.TensorArray(tf.float32, size=count)
        return tf.while_loop(lambda k, out: k < count, body, (0, out))[1].concat()

    return lambda: run(stacked), batches


def serving_function(model, widths):
    """``model`` at inference as a ``tf.function`` traced for an unknown batch size."""
    import tensorflow as tf

    signature = [[tf.TensorSpec([None, w], tf.float32) for w in widths]]
    return tf.function(lambda xs: model(xs, training=False), input_signature=signature)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    report.add_option(parser)
    parser.add_argument("--expensive", choices=["mlp", "deq"], default="mlp")
    parser.add_argument("--cost-weights", type=float, nargs="+", default=[0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0])
    parser.add_argument("--max-val-drop", type=float, default=0.5,
                        help="the headline cost_weight is the cheapest whose validation accuracy drop "
                             "(points, against the expensive expert) is at most this")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default="benchmarks/results/dynmm_bench.json")
    args = parser.parse_args()

    import keras
    import tensorflow as tf

    import dynmm_two_stage as recipe
    from keras_mmfusion.costs import count_macs

    keras.utils.set_random_seed(0)
    epochs = 10 if args.quick else 30
    train, val, test = recipe.make_data(0)
    with report.unrecorded():  # the recipe's training logs
        cheap, expensive, inputs = recipe.pretrain_experts(train, val, args.expensive, epochs)
    expensive_model = recipe.classifier(expensive, inputs)
    expensive_macs = count_macs(expensive, [recipe.WIDTH] * recipe.MODALITIES,
                                loop_trips=15 if args.expensive == "deq" else 1)
    alone = expensive_model.predict(test[0], batch_size=256, verbose=0)
    accuracy_alone = float(np.mean(alone.argmax(-1) == test[1]))
    val_alone = float(np.mean(expensive_model.predict(val[0], batch_size=256, verbose=0).argmax(-1) == val[1]))
    batch = [tf.constant(m[:256]) for m in test[0]]
    widths = [m.shape[-1] for m in test[0]]
    alone_fn = serving_function(expensive_model, widths)
    run_alone = lambda: alone_fn(batch).numpy()  # noqa: E731
    time_alone = median_ms(run_alone)
    graph_alone, graph_batches = batched_in_graph(expensive_model, test[0])
    run_graph_alone = lambda: graph_alone().numpy()  # noqa: E731

    weights = sorted(set(args.cost_weights))
    rows = {}
    for weight in weights:
        print(f"stage 2: cost_weight={weight}", flush=True)
        with report.unrecorded():
            model, layer = recipe.train_gate(cheap, expensive, inputs, train, val, weight, epochs)
        val_accuracy = float(np.mean(model.predict(val[0], batch_size=256, verbose=0).argmax(-1) == val[1]))
        probabilities, route = recipe.predict_with_routing(model, layer, test[0])
        routed_fn = serving_function(model, widths)
        time_ratio, routed_seconds = median_ratio(lambda: routed_fn(batch).numpy(), run_alone, 300, warmup=20)
        graph_routed, _ = batched_in_graph(model, test[0])
        graph_ratio, graph_seconds = median_ratio(lambda: graph_routed().numpy(), run_graph_alone, 30, warmup=3)
        rows[weight] = {
            "accuracy": float(np.mean(probabilities.argmax(-1) == test[1])),
            "val_accuracy_drop_points": 100 * (val_alone - val_accuracy),
            "fraction_to_cheap": float(np.mean(route == 0)),
            "macs_per_sample": float(np.mean(np.asarray(layer.costs)[route])),
            "batch256_ms": 1e3 * routed_seconds,
            "time_reduction": 1 - time_ratio,
            "in_graph_ms_per_batch": 1e3 * graph_seconds / graph_batches,
            "in_graph_time_reduction": 1 - graph_ratio,
            "costs": layer.costs,
        }
        rows[weight]["mac_reduction"] = 1 - rows[weight]["macs_per_sample"] / expensive_macs
        rows[weight]["accuracy_drop_points"] = 100 * (accuracy_alone - rows[weight]["accuracy"])

    eligible = [w for w in weights if rows[w]["val_accuracy_drop_points"] <= args.max_val_drop]
    headline = min(eligible, key=lambda w: rows[w]["macs_per_sample"]) if eligible else None

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    png = os.path.splitext(args.out)[0] + "_accuracy_vs_cost.png"
    fig, ax = plt.subplots(figsize=(5.5, 4))
    xs = [rows[w]["macs_per_sample"] / expensive_macs for w in weights]
    ys = [rows[w]["accuracy"] for w in weights]
    ax.plot(xs, ys, "o-", label="DynMM (hard routing)")
    for w, x_, y_ in zip(weights, xs, ys):
        ax.annotate(f"{w:g}", (x_, y_), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.scatter([1.0], [accuracy_alone], marker="s", color="k", label="expensive expert alone")
    ax.set_xlabel("realised MACs per sample / expensive expert")
    ax.set_ylabel("test accuracy")
    ax.set_title("Accuracy vs cost as cost_weight varies (labels)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)

    machine = describe_machine()
    results = {"machine": machine, "expensive": args.expensive, "headline_cost_weight": headline, "expensive_macs": expensive_macs,
               "accuracy_expensive_alone": accuracy_alone, "expensive_batch256_ms": time_alone,
               "by_cost_weight": {str(k): v for k, v in rows.items()}, "plot": png}
    print(f"\nmachine: {machine}")
    print(f"expensive expert ({args.expensive}) alone: accuracy {accuracy_alone:.4f}, "
          f"{expensive_macs} MACs/sample, batch-256 inference {time_alone:.2f} ms")
    print(f"{'cost_weight':>11} {'accuracy':>9} {'drop pts':>9} {'to cheap':>9} {'MACs/sample':>12} "
          f"{'MAC cut':>8} {'ms/256':>8} {'time cut':>9} {'graph ms':>9} {'graph cut':>10}")
    for w in weights:
        r = rows[w]
        mark = "  <- headline" if w == headline else ""
        print(f"{w:>11g} {r['accuracy']:>9.4f} {r['accuracy_drop_points']:>9.2f} {r['fraction_to_cheap']:>9.3f} "
              f"{r['macs_per_sample']:>12.0f} {r['mac_reduction']:>8.1%} {r['batch256_ms']:>8.2f} "
              f"{r['time_reduction']:>9.1%} {r['in_graph_ms_per_batch']:>9.2f} {r['in_graph_time_reduction']:>10.1%}{mark}")
    print("ms/256, time cut: one call from Python on 256 samples; graph ms, graph cut: per batch of 256, "
          f"{graph_batches} batches in one graph")
    print(f"headline: the cheapest cost_weight whose validation accuracy drop is <= {args.max_val_drop} points "
          "(chosen on validation, not test)")
    print(f"targets: MAC cut >= 40%, time cut >= 25%, accuracy drop <= 0.5 points; plot: {png}")
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    report.run(main, "dynmm_bench")

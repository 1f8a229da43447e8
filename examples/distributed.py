"""Train the DEQ-fusion classifier with tf.distribute, on one machine or several.

    # every GPU (or CPU) of this machine, one replica each; --logical-cpus N splits the
    # CPU into N devices to try it without GPUs
    python examples/distributed.py --strategy mirrored [--logical-cpus 2]

    # one process per worker, each started with its own TF_CONFIG, for example:
    TF_CONFIG='{"cluster": {"worker": ["10.0.0.1:12345", "10.0.0.2:12345"]},
               "task": {"type": "worker", "index": 0}}' \
        python examples/distributed.py --strategy multi-worker

The model and data are the same as on one device; the model is built and compiled in
the strategy's scope. Each global batch is split over the replicas and the gradients are
summed across them; the DEQ solver's statistics (``deq_steps``, ``deq_residual``,
``deq_converged``) describe the global batch.

With MirroredStrategy the model trains with ``model.fit``. Keras 3's ``fit`` fails under
MultiWorkerMirroredStrategy (it cannot reduce the first distributed batch it reads to
build the model; keras-team/keras issue 20585), so the multi-worker run uses a short
custom loop over ``strategy.run`` with the same model, optimizer and loss. With
``--out``, every worker writes its final weights' checksum and losses as JSON (worker 0
also the model), so runs can be compared.
"""

import argparse
import hashlib
import json
import os
import sys

from keras_mmfusion_cli import quiet_tensorflow_import

# TensorFlow's C++ start-up lines are hidden unless --verbose is given.
quiet_tensorflow_import(verbose="--verbose" in sys.argv)


def strategy_for(name, logical_cpus):
    import tensorflow as tf

    if name == "mirrored":
        if logical_cpus > 1:
            cpu = tf.config.list_physical_devices("CPU")[0]
            tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * logical_cpus)
            return tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(logical_cpus)])
        return tf.distribute.MirroredStrategy()
    # Reads the cluster and this worker's place in it from the TF_CONFIG environment variable.
    return tf.distribute.MultiWorkerMirroredStrategy()


def train_in_a_custom_loop(model, strategy, data, epochs, global_batch):
    """Epochs of ``strategy.run`` steps; returns ``{"loss": [...], "deq_steps": [...], ...}`` per epoch."""
    import keras
    import tensorflow as tf

    cross_entropy = keras.losses.SparseCategoricalCrossentropy(reduction="sum")

    def replica_step(x, y):
        with tf.GradientTape() as tape:
            probabilities = model(list(x), training=True)
            # The global batch's mean loss: each replica's sum over its samples divided by
            # the global batch; terms added with add_loss (the Jacobian penalty) are
            # per-replica means, so each replica adds its share.
            loss = cross_entropy(y, probabilities) / global_batch
            if model.losses:
                loss += tf.add_n(model.losses) / strategy.num_replicas_in_sync
        gradients = tape.gradient(loss, model.trainable_variables)
        model.optimizer.apply_gradients(zip(gradients, model.trainable_variables))  # sums over replicas
        return loss

    @tf.function
    def step(x, y):
        return strategy.reduce("SUM", strategy.run(replica_step, args=(x, y)), axis=None)

    # The optimizer's variables are created here, in the strategy's scope: created inside
    # the first call of ``step`` instead, they make TensorFlow trace the step twice.
    with strategy.scope():
        model.optimizer.build(model.trainable_variables)
    fusion = next(layer for layer in model.layers if layer.name.endswith("fusion"))
    history = {}
    for epoch in range(epochs):
        fusion.stats_metric.reset_state()
        losses = [float(step(x, y)) for x, y in strategy.experimental_distribute_dataset(data)]
        logs = {"loss": sum(losses) / len(losses), **{k: float(v) for k, v in fusion.stats_metric.result().items()}}
        print(f"epoch {epoch + 1}/{epochs}: " + " - ".join(f"{k}: {v:.4g}" for k, v in logs.items()))
        for key, value in logs.items():
            history.setdefault(key, []).append(value)
    return history


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--verbose", action="store_true", help="also show TensorFlow's C++ log lines")
    parser.add_argument("--strategy", choices=["mirrored", "multi-worker"], default="mirrored")
    parser.add_argument("--logical-cpus", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--global-batch", type=int, default=64)
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--out", default=None, help="a folder for this worker's JSON report")
    args = parser.parse_args()

    strategy = strategy_for(args.strategy, args.logical_cpus)
    import keras
    import numpy as np
    import tensorflow as tf

    import keras_mmfusion as mmf

    keras.utils.set_random_seed(0)  # the same initial weights on every worker
    x, y = mmf.make_synthetic(args.samples, num_modalities=3, widths=16, noise=0.5, seed=0)
    with strategy.scope():
        model = mmf.models.build_classifier(mmf.DEQFusion(32), [16, 16, 16], 2, encoder_units=32, head_units=32)
        model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy", metrics=["accuracy"])
    print(f"{strategy.num_replicas_in_sync} replicas; global batch {args.global_batch}")
    # A tf.data pipeline of global batches; the strategy splits each batch over the replicas.
    data = tf.data.Dataset.from_tensor_slices((tuple(x), y)).batch(args.global_batch)
    if args.strategy == "mirrored":
        history = model.fit(data, epochs=args.epochs, verbose=2).history
    else:
        history = train_in_a_custom_loop(model, strategy, data, args.epochs, args.global_batch)

    if args.out:
        task = json.loads(os.environ.get("TF_CONFIG", "{}")).get("task", {"index": 0})
        os.makedirs(args.out, exist_ok=True)
        digest = hashlib.sha256(b"".join(np.asarray(w, np.float32).tobytes() for w in model.get_weights()))
        report = {"replicas": strategy.num_replicas_in_sync, "weights_sha256": digest.hexdigest(),
                  "history": {k: [float(v) for v in values] for k, values in history.items()}}
        with open(os.path.join(args.out, f"worker_{task['index']}.json"), "w") as f:
            json.dump(report, f, indent=2)
        if task["index"] == 0:
            model.save(os.path.join(args.out, "model.keras"))


if __name__ == "__main__":
    main()

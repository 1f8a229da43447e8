"""Step-for-step training parity with the official DEQ-fusion ROSMAP code.

    python benchmarks/training_parity.py --peer-code DIR [--peer-python PYTHON] [--data DIR]
        [--steps 200] [--dtype float64 float32] [--seed 0] [--dropout 0.5] [--threads N] [--json FILE]
        [--record]
    python benchmarks/training_parity.py --peer-code DIR --evaluate MODEL.keras [MODEL.keras ...]
    python benchmarks/training_parity.py --peer-code DIR --precision [--dropout 0.5] [--mask-seed N]

``DIR`` is the ``experiments/BRCA`` folder of the official code of Ni et al. ("Deep
Equilibrium Multimodal Fusion", arXiv 2306.16645, repository jinhong-ni/DEQFusion), used
unmodified and run in a subprocess (see ``official_rosmap.py`` for the runtime shims).
``--data`` is ROSMAP in MOGONET's layout (default ``$MMFUSION_ROSMAP``).

What both sides run: the official ``MMDynamic`` on one side, the package's reference
classifier (``build_reference_classifier`` with ``keras_mmfusion.training.REFERENCE_RECIPE``)
on the other, with

- the same initial weights: the official model's, seeded with ``torch.manual_seed(seed)``,
  written to an npz file and loaded into every Keras layer (gates, encoders, confidence
  heads, the DEQ update, the classifier);
- the same inputs: all 245 training patients as one batch, min-max scaled by the official
  code's ``prepare_trte_data`` (the Keras model is built without its own scaling);
- dropout off (or, with ``--dropout``, the same masks on both sides: each step's from
  NumPy's ``default_rng([mask_seed, step])``, passed to the official ``mm_model.py`` in
  place of ``F.dropout``'s draw and to the package's ``encoder_dropout_<v>`` layers in
  place of theirs), and solves that never stop early: the official Anderson gets a tolerance
  below zero, the package's solves one no residual meets, so both run their whole budgets
  (the recipe's 30 forward evaluations and 31 adjoint ones);
- the same Jacobian probes: at step ``t`` both sides draw them with NumPy's
  ``default_rng([probe_seed, t])``; the official ``jacobian.py`` receives them in place of
  ``torch.randn``, the package's ``DEQFusion`` in place of its own draw (the harness
  replaces ``gaussian_probes`` in the layer's module);
- ``--steps`` optimiser steps with the recipe's optimiser, schedule, clipping and weight
  decay, through the package's ``fit_classifier`` (one full batch per epoch).

At every step it compares the total loss (the recipe trains on the official loss) and
each term: the cross-entropy, each view's sparsity and confidence loss and the Jacobian penalty. It
prints the relative differences at a few steps and the largest over all steps, and says
whether they meet the target (1e-4 in float64, 1e-3 in float32). As mechanism checks it
also prints the first step's gradients and the weights after the last step against the
official ones, and the package's side against itself from initial weights a relative
``--perturbation`` apart, which shows how far rounding-sized differences grow in these
training dynamics on their own.

``--evaluate`` checks the other end of training, the scoring: each saved reference
classifier (a ``.keras`` file, e.g. one trained with the recipe) predicts the test patients
with its own min-max scaling and solves, and its weights, written under the official
parameter names, go into the official model, which scores the same patients as its
``train()`` does. It prints how far the two sets of probabilities are apart and both
accuracies.

``--precision`` checks float32 arithmetic: from the official model's float32 initial weights
(also loaded, in float64, into the official model), with the same inputs, masks and probes,
it prints how far each code's float32 first-step gradients lie from the official code's
float64 ones, per parameter and over all of them, with the package's float64 gradients as
the check that both sides compute the same step.
"""

import argparse
import dataclasses
import json
import os
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import official_rosmap  # noqa: E402
import report  # noqa: E402
from timing import machine  # noqa: E402

TARGET = {"float64": 1e-4, "float32": 1e-3}
# A relative perturbation of the initial weights a little above each dtype's rounding.
PERTURBATION = {"float64": 1e-12, "float32": 1e-6}
NEVER = 1e-300  # a tolerance no residual meets
VIEWS = 3
TERMS = ["total", "cross_entropy"] + [f"sparsity_{v}" for v in range(VIEWS)] + \
        [f"confidence_{v}" for v in range(VIEWS)] + ["jacobian"]


def parity_settings(recipe, dropout=0.0):
    """The recipe with dropout at ``dropout`` (its masks are then set per step, see
    :class:`StepRecorder`), no scaling inside the model, and forward and adjoint solves
    whose tolerance no residual meets."""
    from keras_mmfusion.equilibrium.adjoint import as_adjoint

    adjoint = as_adjoint(recipe.fusion_options["backward"])
    fusion = dict(recipe.fusion_options, tol=NEVER,
                  backward=type(adjoint).from_config({**adjoint.get_config(), "tol": NEVER}))
    return dataclasses.replace(recipe, dropout=dropout, standardize=False, fusion_options=fusion)


def paired_variables(model):
    """``[(keras variable, official parameter name, transposed)]`` for every parameter of
    the official model: gates, encoders, confidence heads, the DEQ update, the classifier."""
    pairs = []

    def dense(layer, prefix):
        pairs.extend([(layer.kernel, prefix + ".weight", True), (layer.bias, prefix + ".bias", False)])

    def norm(layer, prefix):
        pairs.extend([(layer.gamma, prefix + ".weight", False), (layer.beta, prefix + ".bias", False)])

    for v in range(VIEWS):
        dense(model.get_layer(f"feature_gate_{v}").dense, f"FeatureInforEncoder.{v}.clf.0")
        dense(model.get_layer(f"encoder_{v}"), f"FeatureEncoder.{v}.clf.0")
        head = model.get_layer(f"confidence_{v}")
        dense(head.classifier, f"TCPClassifierLayer.{v}.clf.0")
        dense(head.confidence, f"TCPConfidenceLayer.{v}.clf.0")
    dense(model.get_layer("probabilities"), "MMClasifier.0.clf.0")
    fusion = model.get_layer("deq_fusion")
    for i, block in enumerate(fusion.modality_blocks):
        prefix = f"deq_fusion.func_.branches.{i}"
        dense(block.dense1, prefix + ".conv1")
        dense(block.dense2, prefix + ".conv2")
        for j, layer in enumerate((block.norm1, block.norm2, block.norm3), 1):
            norm(layer, f"{prefix}.gn{j}")
    block, prefix = fusion.fusion_block, f"deq_fusion.func_.branches.{VIEWS}"
    dense(block.gate, prefix + ".gate")
    dense(block.combine, prefix + ".fuse")
    norm(block.norm, prefix + ".gn3")
    return pairs


def official_weights_into(model, weights):
    """Load the official model's ``state_dict`` (an npz mapping) into the reference
    classifier; every trainable variable and every official parameter must be paired."""
    pairs = paired_variables(model)
    names = {name for _, name, _ in pairs}
    left = sorted(k for k in weights if k not in names and not k.startswith("input_") and k != "labels")
    unpaired = [v.path for v in model.trainable_variables if not any(v is p for p, _, _ in pairs)]
    if left or unpaired:
        raise ValueError(f"Unpaired parameters: official {left}, Keras {unpaired}")
    for variable, name, transposed in pairs:
        variable.assign(weights[name].T if transposed else weights[name])


def weight_differences(model, initial, final):
    """Per official parameter, ``||ours - theirs||`` of the weights after the run, relative
    to ``||change||`` of the official weights over the run."""
    out = {}
    for variable, name, transposed in paired_variables(model):
        ours = np.asarray(variable.numpy())
        ours = ours.T if transposed else ours
        change = final[name] - initial[name]
        out[name] = float(np.linalg.norm(ours - final[name]) / max(np.linalg.norm(change), 1e-300))
    return out


def step_masks(mask_seed, step, shape, rate):
    """Each view's dropout mask at ``step``, as the official side's driver draws them:
    NumPy's ``default_rng([mask_seed, step])``, kept units scaled by ``1 / (1 - rate)``."""
    rng = np.random.default_rng([mask_seed, step])
    return [(rng.random(shape) >= rate) / (1 - rate) for _ in range(VIEWS)]


def fix_dropout(model, masks):
    """Make each ``encoder_dropout_<v>`` layer multiply by the variable ``masks[v]`` in
    training instead of drawing a mask."""
    for v, mask in enumerate(masks):
        layer = model.get_layer(f"encoder_dropout_{v}")
        layer.call = lambda inputs, training=False, fixed=mask: inputs * fixed if training else inputs


class StepRecorder(keras.callbacks.Callback):
    """Sets each step's Jacobian probes (and dropout masks) before the step and keeps its
    logged loss terms."""

    def __init__(self, probes, probe_shape, probe_seed, num_probes, masks=(), mask_seed=None, rate=0.0):
        super().__init__()
        self.probes, self.shape, self.seed, self.num_probes = probes, probe_shape, probe_seed, num_probes
        self.masks, self.mask_seed, self.rate = masks, mask_seed, rate
        self.steps = []

    def on_train_batch_begin(self, batch, logs=None):
        step = len(self.steps)
        rng = np.random.default_rng([self.seed, step])
        self.probes.assign(np.stack([rng.standard_normal(self.shape) for _ in range(self.num_probes)]))
        if self.masks:
            drawn = step_masks(self.mask_seed, step, tuple(self.masks[0].shape), self.rate)
            for variable, mask in zip(self.masks, drawn):
                variable.assign(mask)

    def on_train_batch_end(self, batch, logs=None):
        self.steps.append({k: float(v) for k, v in (logs or {}).items()})


def first_step_gradients(model, xs, labels, loss_weight):
    """``{official name: gradient}`` of the loss the recipe trains on, at the model's
    weights, for the probes already set."""
    from keras_mmfusion.layers import training_labels

    with tf.GradientTape() as tape, training_labels(labels):
        probabilities = model(xs, training=True)
        loss = keras.losses.sparse_categorical_crossentropy(labels, probabilities)
        loss = loss_weight * tf.reduce_mean(loss) + tf.add_n(model.losses)
    pairs = paired_variables(model)
    grads = tape.gradient(loss, [v for v, _, _ in pairs])
    return {name: (g.numpy().T if transposed else g.numpy()) for g, (_, name, transposed) in zip(grads, pairs)}


def keras_side(weights, settings, steps, probe_seed, dtype, mask_seed=None):
    """The package's recipe trained for ``steps`` full-batch steps from the official weights:
    ``(rows of loss terms per step, the trained model, the first step's gradients)``. With
    ``settings.dropout``, each step's masks come from ``step_masks(mask_seed, ...)``."""
    from keras_mmfusion.layers import deq_fusion as deq_module
    from keras_mmfusion.training import build_model, fit_classifier, fit_options
    from keras_mmfusion.training.protocol import Splits

    keras.config.set_floatx(dtype)
    keras.config.set_dtype_policy(dtype)
    xs = [weights[f"input_{v}"].astype(dtype) for v in range(VIEWS)]
    labels = weights["labels"]
    splits = Splits((xs, labels), (xs, labels), 2, "rosmap")
    model = build_model("reference", splits, settings)
    official_weights_into(model, weights)
    fusion = model.get_layer("deq_fusion")
    state = (len(labels), (VIEWS + 1) * fusion._state_units)
    num_probes = fusion.jacobian_probes
    probes = tf.Variable(tf.zeros((num_probes,) + state, dtype), trainable=False)
    drawn = deq_module.gaussian_probes
    deq_module.gaussian_probes = lambda z, n, seed=None: tf.identity(probes)
    masks = []
    if settings.dropout:
        masks = [tf.Variable(tf.zeros((len(labels), settings.units), dtype), trainable=False) for _ in range(VIEWS)]
        fix_dropout(model, masks)
    recorder = StepRecorder(probes, state, probe_seed, num_probes, masks, mask_seed, settings.dropout)
    recorder.on_train_batch_begin(0)
    first_gradients = first_step_gradients(model, xs, labels, settings.loss_weight)
    try:
        if steps:
            fit_classifier(model, (xs, labels), steps, callbacks=[recorder],
                           **dict(fit_options(settings), batch_size=len(labels), shuffle=False))
    finally:
        deq_module.gaussian_probes = drawn
    gate_weights = [model.get_layer(f"feature_gate_{v}").sparsity_weight for v in range(VIEWS)]
    confidence_weights = [model.get_layer(f"confidence_{v}").loss_weight for v in range(VIEWS)]
    rows = []
    for logs in recorder.steps:
        row = {"total": logs["loss"], "jacobian": logs["deq_fusion_jacobian"]
               if "deq_fusion_jacobian" in logs else logs.get("deq_jacobian", float("nan"))}
        weighted = fusion.jacobian_weight * row["jacobian"]
        for v in range(VIEWS):
            row[f"sparsity_{v}"] = logs[f"feature_gate_{v}_sparsity"]
            row[f"confidence_{v}"] = logs[f"confidence_{v}_loss"]
            weighted += gate_weights[v] * row[f"sparsity_{v}"] + confidence_weights[v] * row[f"confidence_{v}"]
        row["cross_entropy"] = (logs["loss"] - weighted) / settings.loss_weight
        row["logs"] = logs
        rows.append(row)
    return rows, model, first_gradients


def official_rows(steps):
    rows = []
    for s in steps:
        row = {"total": s["total"], "cross_entropy": s["cross_entropy"], "jacobian": s["jacobian"]}
        for v in range(VIEWS):
            row[f"sparsity_{v}"] = s["sparsity"][v]
            row[f"confidence_{v}"] = s["confidence"][v]
        rows.append(row)
    return rows


def relative_differences(ours, theirs):
    """``{term: [|ours - theirs| / |theirs| per step]}``."""
    return {t: [abs(a[t] - b[t]) / max(abs(b[t]), 1e-300) for a, b in zip(ours, theirs)] for t in TERMS}


def official_side(args, settings, dtype, steps, start=None):
    """The official code's parity run: ``(its JSON result, initial weights and inputs, final
    weights, first step's gradients)``, from the seed's draw or from the npz file ``start``."""
    with tempfile.TemporaryDirectory() as scratch:
        files = {name: os.path.join(scratch, f"{name}.npz") for name in ("initial", "final", "gradients")}
        official = official_rosmap.run_official(
            args.peer_python, args.peer_code, args.data, "parity", args.threads, dtype=dtype, seed=args.seed,
            steps=steps, units=settings.units, f_thres=settings.fusion_options["max_iter"],
            b_thres=settings.fusion_options["backward"].max_iter,
            jacobian_weight=settings.fusion_options["jacobian_weight"],
            probes=settings.fusion_options["jacobian_probes"], probe_seed=args.probe_seed, lr=settings.lr,
            dropout=args.dropout, mask_seed=args.mask_seed, start=start,
            weight_decay=settings.weight_decay, lr_decay_every=settings.lr_decay_every, weights=files["initial"],
            final_weights=files["final"], gradients=files["gradients"])
        return (official, *(dict(np.load(files[n])) for n in ("initial", "final", "gradients")))


def precision(args):
    """Each code's float32 first-step gradients against float64 ones from the same weights,
    inputs, masks and probes: how much each side's float32 arithmetic moves a training step."""
    from keras_mmfusion.training import REFERENCE_RECIPE

    settings = parity_settings(REFERENCE_RECIPE, args.dropout)
    _, weights, _, official32 = official_side(args, settings, "float32", 1)
    wide = {k: v.astype(np.float64) if v.dtype.kind == "f" else v for k, v in weights.items()}
    with tempfile.TemporaryDirectory() as scratch:
        start = os.path.join(scratch, "start.npz")
        np.savez(start, **{k: v for k, v in wide.items() if not k.startswith("input_") and k != "labels"})
        _, _, _, official64 = official_side(args, settings, "float64", 1, start=start)
    with report.unrecorded():
        ours32 = keras_side(weights, settings, 0, args.probe_seed, "float32", args.mask_seed)[2]
        ours64 = keras_side(wide, settings, 0, args.probe_seed, "float64", args.mask_seed)[2]

    def error(gradients, name=None):
        names = [name] if name else sorted(official64)
        theirs = np.concatenate([official64[n].ravel() for n in names])
        ours = np.concatenate([gradients[n].astype(np.float64).ravel() for n in names])
        return float(np.linalg.norm(ours - theirs) / max(np.linalg.norm(theirs), 1e-300))

    sides = {"official float32": official32, "package float32": ours32, "package float64": ours64}
    rows = {name: {side: error(g, name) for side, g in sides.items()} for name in official64}
    print(f"First step's gradients against the official code's float64 ones from the same weights: ROSMAP, "
          f"{len(weights['labels'])} patients in one batch, seed {args.seed}, "
          + (f"dropout {args.dropout:g} with the same masks" if args.dropout else "dropout off")
          + "; ||g - g64|| / ||g64||, the ten parameters the package's float32 step moves most")
    print(f"{'parameter':44}  " + "  ".join(f"{side:>16}" for side in sides))
    for name in sorted(rows, key=lambda n: -rows[n]["package float32"])[:10]:
        print(f"{name:44}  " + "  ".join(f"{rows[name][side]:16.2e}" for side in sides))
    overall = {side: error(g) for side, g in sides.items()}
    print(f"{'all parameters':44}  " + "  ".join(f"{overall[side]:16.2e}" for side in sides))
    print()
    return {"precision": True, "parameters": rows, "all": overall}


def compare(args, dtype):
    """One parity run in ``dtype``: prints its table and returns what the JSON keeps."""
    from keras_mmfusion.training import REFERENCE_RECIPE

    settings = parity_settings(REFERENCE_RECIPE, args.dropout)
    official, weights, final, official_gradients = official_side(args, settings, dtype, args.steps)
    with report.unrecorded():
        ours, trained, first = keras_side(weights, settings, args.steps, args.probe_seed, dtype, args.mask_seed)
    gradients_first = {name: float(np.linalg.norm(g - official_gradients[name]) /
                                   max(np.linalg.norm(official_gradients[name]), 1e-300))
                       for name, g in first.items()}
    weights_after = weight_differences(trained, weights, final)
    theirs = official_rows(official["steps"])
    differences = relative_differences(ours, theirs)
    target = TARGET[dtype]
    shown = sorted({s for s in (0, 1, 2, 5, 10, 20, 50, 100, 150, args.steps - 1) if s < args.steps})
    print(f"Training parity with the official code: ROSMAP, {len(weights['labels'])} patients in one batch, "
          f"{dtype}, {args.steps} steps, seed {args.seed}, "
          + (f"dropout {args.dropout:g} with the same masks" if args.dropout else "dropout off")
          + "; relative difference of each loss term")
    print(f"{'step':>5}  {'official total':>14}  " + "  ".join(f"{t[:12]:>12}" for t in TERMS))
    for s in shown:
        print(f"{s:>5}  {theirs[s]['total']:14.6f}  " + "  ".join(f"{differences[t][s]:12.2e}" for t in TERMS))
    worst = {t: max(d) for t, d in differences.items()}
    print(f"{'max':>5}  {'':>14}  " + "  ".join(f"{worst[t]:12.2e}" for t in TERMS))
    missed = min((s for s in range(args.steps) if any(differences[t][s] > target for t in TERMS)), default=None)
    print(f"target: every term within {target:g} at every step: "
          + ("met" if missed is None else f"missed from step {missed}"))
    largest = sorted(gradients_first.items(), key=lambda kv: -kv[1])[:3]
    print("first step's gradients, ||ours - official|| / ||official||, largest three: " +
          ", ".join(f"{k} {v:.2e}" for k, v in largest))
    largest = sorted(weights_after.items(), key=lambda kv: -kv[1])[:3]
    print("weights after the last step, ||ours - official|| / ||official change||, largest three: " +
          ", ".join(f"{k} {v:.2e}" for k, v in largest))
    solves = official["steps"]
    perturbation = args.perturbation if args.perturbation is not None else PERTURBATION[dtype]
    if perturbation:
        # The same side twice, from initial weights a relative `perturbation` apart: how
        # far rounding-sized differences grow in these training dynamics by themselves.
        rng = np.random.default_rng(0)
        perturbed = {k: v * (1 + perturbation * rng.standard_normal(v.shape)) if v.dtype.kind == "f"
                     and not k.startswith("input_") else v for k, v in weights.items()}
        with report.unrecorded():
            again, _, _ = keras_side(perturbed, settings, args.steps, args.probe_seed, dtype, args.mask_seed)
        itself = relative_differences(again, ours)
        largest = [max(itself[t][s] for t in TERMS) for s in shown]
        print(f"the package against itself from weights a relative {perturbation:g} apart, largest term "
              "difference at the steps above: " + ", ".join(f"{d:.1e}" for d in largest))
    print(f"official solves: forward residual (abs, whole batch) at step 0 {solves[0]['forward_residual']:.3g}, "
          f"last {solves[-1]['forward_residual']:.3g}; adjoint relative residual at step 0 "
          f"{solves[0]['backward_relative']:.3g}, last {solves[-1]['backward_relative']:.3g}; "
          f"gradient norm above the clip (30) at {sum(s['grad_norm'] > 30 for s in solves)} of {args.steps} steps")
    print()
    return {"dtype": dtype, "target": target, "met": missed is None, "official": official, "ours": ours,
            "differences": differences, "weight_differences": weights_after,
            "first_gradient_differences": gradients_first}


def evaluate(args, path):
    """One saved reference classifier scored on the test patients by the package (its own
    min-max scaling and solves) and, with the same weights, by the official code."""
    from keras_mmfusion.training import classification_metrics, load_splits

    model = keras.models.load_model(path)
    splits = load_splits(args.data)
    ours = model.predict(splits.test[0], batch_size=len(splits.test[1]), verbose=0)
    fusion = model.get_layer("deq_fusion")
    with tempfile.TemporaryDirectory() as scratch:
        weights = os.path.join(scratch, "weights.npz")
        np.savez(weights, **{name: (v.numpy().T if transposed else v.numpy())
                             for v, name, transposed in paired_variables(model)})
        official = official_rosmap.run_official(
            args.peer_python, args.peer_code, args.data, "evaluate", args.threads, weights=weights,
            units=fusion._state_units, f_thres=fusion.max_iter, b_thres=fusion.max_iter + 1,
            jacobian_weight=fusion.jacobian_weight)
    theirs = np.asarray(official["probabilities"])
    row = {"model": path, "max_probability_difference": float(np.max(np.abs(ours - theirs))),
           "same_class": float(np.mean(ours.argmax(-1) == theirs.argmax(-1))),
           "accuracy": classification_metrics(splits.test[1], ours)["accuracy"],
           "official_accuracy": classification_metrics(splits.test[1], theirs)["accuracy"],
           "official_relative_residual": official["relative_residual"]}
    print(f"{path}: test probabilities within {row['max_probability_difference']:.2e} of the official code's "
          f"(same class for {100 * row['same_class']:.1f}% of patients); accuracy {100 * row['accuracy']:.1f} "
          f"(official {100 * row['official_accuracy']:.1f}); official solve's lowest relative residual "
          f"{row['official_relative_residual']:.2e}", flush=True)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    report.add_option(parser)
    parser.add_argument("--peer-code", required=True, help="the official code's experiments/BRCA folder")
    parser.add_argument("--peer-python", default=official_rosmap.DEFAULT_PEER_PYTHON,
                        help="a Python with PyTorch for the official code (default: $MMFUSION_PEER_PYTHON)")
    parser.add_argument("--data", default=os.environ.get("MMFUSION_ROSMAP"), help="ROSMAP in MOGONET's layout")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--dtype", nargs="+", choices=sorted(TARGET), default=["float64", "float32"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--probe-seed", type=int, default=1)
    parser.add_argument("--dropout", type=float, default=0.0,
                        help="the encoders' dropout rate (the recipe's is 0.5); both sides multiply by the same "
                             "masks, drawn per step with NumPy's default_rng([mask seed, step]) (default 0: off)")
    parser.add_argument("--mask-seed", type=int, default=2, help="seed of the dropout masks (with --dropout)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--perturbation", type=float, default=None,
                        help="also train the package's side from weights this far apart (relative; default "
                             "1e-12 in float64, 1e-6 in float32, a few roundings); 0: skip")
    parser.add_argument("--evaluate", nargs="+", default=None, metavar="MODEL",
                        help="instead of the training runs: score these saved reference classifiers (.keras) "
                             "with the package and, with their weights, with the official code")
    parser.add_argument("--precision", action="store_true",
                        help="instead of the training runs: each code's float32 first-step gradients against "
                             "float64 ones from the same weights")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if not 0 <= args.dropout < 1:
        parser.error(f"--dropout must be in [0, 1), got {args.dropout}")
    official_rosmap.check_peer(args.peer_python, args.peer_code)
    if not args.data or not os.path.isfile(os.path.join(args.data, "labels_tr.csv")):
        sys.exit("ROSMAP is needed: pass --data or set MMFUSION_ROSMAP to a folder in MOGONET's layout.")
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    if args.evaluate:
        runs = [evaluate(args, path) for path in args.evaluate]
    elif args.precision:
        runs = [precision(args)]
    else:
        runs = [compare(args, dtype) for dtype in args.dtype]
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"runs": runs, "steps": args.steps, "seed": args.seed, "dropout": args.dropout,
                       "mask_seed": args.mask_seed, "probe_seed": args.probe_seed, "machine": machine()}, f)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    report.run(main, "training_parity")

"""The ``mmfusion`` command: train, evaluate, export and benchmark fusion models.

    mmfusion train --data synthetic --fusion deq --epochs 30 --out runs/deq
    mmfusion train --data handwritten.mat --out runs/digits
    mmfusion evaluate --model runs/deq/model.keras --data synthetic [--json]
    mmfusion export --model runs/deq/model.keras --format tflite --quantize float16
    mmfusion bench deq [-- benchmark arguments]

Errors are reported as one line on stderr with exit status 2. TensorFlow's C++ start-up
lines (oneDNN, CUDA drivers, absl) are not shown unless ``--verbose`` is given or
``TF_CPP_MIN_LOG_LEVEL`` is set (see :func:`quiet_tensorflow_import`).

This module sits beside the ``keras_mmfusion`` package, not inside it. Importing the
package imports Keras and TensorFlow (about 3 s), and it has to: that import registers
the layers, so that ``.keras`` files load in safe mode. Here the arguments are parsed
first, so ``--help`` and argument errors answer at once, and each command imports what
it needs. The training defaults shown in ``--help`` are read from the package's
``training/recipe.json`` without importing the package.
"""

import argparse
import contextlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading

BENCHMARKS = {
    "deq": "deq_bench.py",
    "zoo": "fusion_zoo.py",
    "dynmm": "dynmm_bench.py",
    "export": "export_bench.py",
    "missing": "missing_modalities.py",
    "mixed": "mixed_precision_bench.py",
}


HEADER_HELP = ("every CSV file of --data starts with a header row, which is skipped (without it, a first row "
               "that looks like a header is refused)")


def _recipe():
    """``keras_mmfusion/training/recipe.json``: the training recipe and the fusion names."""
    package = importlib.util.find_spec("keras_mmfusion").submodule_search_locations[0]
    with open(os.path.join(package, "training", "recipe.json")) as f:
        return json.load(f)


class CommandError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise CommandError(f"{self.prog}: {message}")


#: Set to "1" beside ``TF_CPP_MIN_LOG_LEVEL`` when :func:`quiet_tensorflow_import` set the level.
_QUIET_MARK = "MMFUSION_QUIET_IMPORT"


def quiet_tensorflow_import(verbose=False):
    """Import TensorFlow without the C++ log lines its shared libraries print as they load.

    Those lines (absl's "All log messages before absl::InitializeLog()", CUDA drivers not
    found, oneDNN) are written straight to file descriptor 2 before TensorFlow reads
    ``TF_CPP_MIN_LOG_LEVEL``, so the variable alone does not hide them. Here descriptor 2
    points to the null device for the import only, while Python's ``sys.stderr`` keeps
    the real one: Python warnings, the package's own included, stay visible. Later C++
    logging below fatal errors is off (``TF_CPP_MIN_LOG_LEVEL=3``).

    Nothing is silenced with ``verbose=True``, when the user has set
    ``TF_CPP_MIN_LOG_LEVEL`` (their choice stands), or when TensorFlow is already imported.
    The level this function sets is marked as its own (``_QUIET_MARK``) in the environment
    that child processes inherit, so a child that calls it too, such as a "spawn" worker
    re-running a script's top level, imports TensorFlow quietly as well.
    """
    users_level = "TF_CPP_MIN_LOG_LEVEL" in os.environ and os.environ.get(_QUIET_MARK) != "1"
    if verbose or users_level or "tensorflow" in sys.modules:
        import tensorflow  # noqa: F401

        return
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    os.environ[_QUIET_MARK] = "1"
    sys.stderr.flush()
    real = os.dup(2)
    # Kept open for the life of the process: a logging handler made during the import
    # may hold this stream.
    python_stderr, sys.stderr = sys.stderr, open(real, "w", buffering=1, closefd=False)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        import tensorflow  # noqa: F401
    finally:
        sys.stderr.flush()
        os.dup2(real, 2)
        os.close(null)
        sys.stderr = python_stderr


def _add_split_options(parser, recorded):
    """The options that say how data without a test split of its own is read and split."""
    default = " (default: as recorded with the model, else %s)" if recorded else " (default: %s)"
    parser.add_argument("--label-base", type=int, choices=[0, 1], default=None,
                        help="a .mat file's first class number: 1 shifts labels 1..k to 0..k-1 (labels from 1 "
                             "are refused without it)" + (" (default: as recorded with the model)" if recorded else ""))
    parser.add_argument("--test-fraction", type=float, default=None,
                        help="share of the samples held out (stratified) as the test split of a .mat file or a "
                             "folder without one" + default % "0.2")
    parser.add_argument("--split-seed", type=int, default=None,
                        help="seed of that test split" + default % "0")


def build_parser():
    recipe = _recipe()
    defaults = argparse.Namespace(**recipe["settings"])
    parser = _Parser(prog="mmfusion", description="Train, evaluate, export and benchmark multimodal fusion models.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--verbose", action="store_true",
                        help="also show TensorFlow's C++ log lines (start-up, devices, XLA)")

    train = sub.add_parser("train", parents=[common], help="train a fusion classifier", description=(
        "Train a classifier (per-modality encoders, a fusion layer, an MLP head). 20% of the training "
        "split (stratified) is held out for validation; the epoch with the best validation value is "
        "kept; the test split is evaluated once at the end."))
    train.add_argument("--data", default="synthetic",
                       help="'synthetic' (default), 'rosmap', a folder: MOGONET layout (1_tr.csv, 1_te.csv, ..., "
                            "labels_tr.csv, labels_te.csv) or one .csv/.npy file per modality plus labels.csv, "
                            "or a multi-view MATLAB .mat file (views in a cell array X, labels gt, Y or truth; "
                            "needs pip install 'keras_mmfusion[mat]')")
    train.add_argument("--header", action="store_true", help=HEADER_HELP)
    _add_split_options(train, recorded=False)
    train.add_argument("--fusion", default="deq", choices=recipe["fusions"], help="fusion method (default: deq)")
    train.add_argument("--fusion-options", default="{}", metavar="JSON",
                       help="keyword arguments of the fusion layer as a JSON object, e.g. "
                            "'{\"jacobian_weight\": 20, \"max_iter\": 60}' for deq (default: none)")
    train.add_argument("--epochs", type=int, default=defaults.epochs, help="maximum epochs (default: %(default)s)")
    train.add_argument("--patience", type=int, default=defaults.patience,
                       help="early-stopping patience in epochs; 0 runs every epoch (default: %(default)s)")
    train.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    train.add_argument("--seeds", type=int, default=1,
                       help="train with N seeds (--seed, --seed + 1, ...), each in OUT/seed_<s>, and print the "
                            "test metrics' mean +- std (default: 1, written to OUT itself)")
    train.add_argument("--refit", action="store_true",
                       help="use the validation split only to choose the number of epochs, then retrain on the "
                            "whole training split for that many epochs and test that model")
    train.add_argument("--units", type=int, default=None,
                       help="encoder, fusion and head width (default: chosen from the data: 4 per class rounded "
                            f"up to a power of two, within [8, 128] and no wider than the widest view; "
                            f"{defaults.units} for two classes)")
    train.add_argument("--dropout", type=float, default=defaults.dropout,
                       help="dropout after encoders and in the head (default: %(default)s)")
    train.add_argument("--modality-weight", type=float, default=defaults.modality_weight,
                       help="weight of the per-modality softmax heads trained alongside the fusion "
                            "(deep supervision of the encoders; 0 for none; default: %(default)s)")
    train.add_argument("--modality-dropout", type=float, default=defaults.modality_dropout, metavar="RATE",
                       help="drop each modality of a training sample with this probability (one always "
                            "stays), so that the model copes with missing ones; the model then takes a "
                            "modality_mask input (default: %(default)s, off)")
    train.add_argument("--lr", type=float, default=defaults.lr, help="Adam learning rate (default: %(default)s)")
    train.add_argument("--batch-size", type=int, default=defaults.batch_size, help="batch size (default: %(default)s)")
    train.add_argument("--monitor", default="val_loss", choices=["val_loss", "val_accuracy"],
                       help="validation value that selects the best epoch (default: val_loss)")
    train.add_argument("--jit", action="store_true", help="compile the training step with XLA")
    train.add_argument("--no-standardize", action="store_true",
                       help="feed the raw features (default: standardise each feature with the mean and "
                            "variance of the training part; the statistics are saved in the model)")
    train.add_argument("--out", default="runs/train",
                       help="output folder (default: runs/train); it must not hold a run already, unless "
                            "--overwrite is given. The run is written beside it and moved into place when it "
                            "ends, so an interrupted run leaves no half-written folder")
    train.add_argument("--overwrite", action="store_true", help="replace the run that --out holds")
    train.add_argument("--quiet", action="store_true", help="no progress bar")

    evaluate = sub.add_parser("evaluate", parents=[common], help="evaluate a saved model on a test split")
    evaluate.add_argument("--model", required=True, help="a .keras file written by 'mmfusion train'")
    evaluate.add_argument("--data", default=None,
                          help="as for 'train'; its test split is used (default: the data 'mmfusion train' "
                               "recorded in metrics.json next to the model)")
    evaluate.add_argument("--header", action="store_true", help=HEADER_HELP + " (default: as recorded with the model)")
    _add_split_options(evaluate, recorded=True)
    evaluate.add_argument("--json", action="store_true", help="print JSON instead of a table")

    export = sub.add_parser("export", parents=[common],
                            help="export a saved model to SavedModel, TFLite or ONNX")
    export.add_argument("--model", required=True, help="a .keras file")
    export.add_argument("--format", required=True, choices=["saved_model", "tflite", "onnx"])
    export.add_argument("--quantize", choices=["float16", "dynamic", "int8"], help="TFLite quantization")
    export.add_argument("--data", default=None,
                        help="data (as for 'train'): its training split calibrates int8 and its test split "
                             "verifies the export; default: the data recorded in metrics.json next to the model")
    export.add_argument("--header", action="store_true", help=HEADER_HELP + " (default: as recorded with the model)")
    _add_split_options(export, recorded=True)
    export.add_argument("--diagnostics", action="store_true",
                        help="also return each DEQ layer's solver steps, trace, residuals and converged flags")
    export.add_argument("--out", default=None, help="output path (default: next to the model)")
    export.add_argument("--allow-flex", action="store_true", help="TFLite: allow TF (Flex) ops")
    export.add_argument("--strip-names", action="store_true",
                        help="TFLite: clear the intermediate tensors' names for a smaller file (inputs, outputs "
                             "and the signature keep theirs)")
    export.add_argument("--overwrite", action="store_true", help="replace an existing output file or directory")

    bench = sub.add_parser("bench", help="run a benchmark script from the source checkout's benchmarks/")
    bench.add_argument("name", choices=sorted(BENCHMARKS), help="which benchmark")
    bench.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the benchmark script")
    return parser


# -- subcommands --------------------------------------------------------------------


BUILT_IN_DATA = ("synthetic", "rosmap")


def _check_data(spec):
    """Refuse a ``--data`` folder or ``.mat`` file that does not exist, before TensorFlow is imported."""
    if spec.endswith(".mat"):
        if not os.path.isfile(spec):
            raise CommandError(f"{spec}: file not found")
    elif spec not in BUILT_IN_DATA and not os.path.isdir(spec):
        raise CommandError(f"{spec}: data folder not found (expected 'synthetic', 'rosmap', a folder or a .mat file)")


def _check_model_file(path):
    """Refuse a ``--model`` that is not a file or not a zip archive, before TensorFlow is imported."""
    if not os.path.isfile(path):
        raise CommandError(f"model file not found: {path}")
    import zipfile

    if not zipfile.is_zipfile(path):
        raise CommandError(f"{path} is not a valid .keras archive (a .keras file is a zip archive written by model.save)")


# The files by which a folder is recognised as holding an 'mmfusion train' run.
RUN_FILES = ("metrics.json", "summary.json", "model.keras", "history.json")


def _check_out(out, overwrite):
    """Refuse an ``--out`` that holds files, before TensorFlow is imported: a run unless
    ``--overwrite`` is given, anything else always (it is not this command's to delete)."""
    if not os.path.exists(out):
        return
    if not os.path.isdir(out):
        raise CommandError(f"--out {out} is a file, not a folder")
    entries = sorted(os.listdir(out))
    if not entries:
        return
    if not any(name in entries for name in RUN_FILES):
        raise CommandError(f"--out {out} holds files that are not an 'mmfusion train' run ({', '.join(entries[:3])}"
                           f"{', ...' if len(entries) > 3 else ''}); choose another folder")
    if not overwrite:
        raise CommandError(f"--out {out} already holds a run; pass --overwrite to replace it, or choose another folder")


@contextlib.contextmanager
def _staged_run(out, overwrite):
    """A new folder beside ``out`` to write a run into, moved to ``out`` when the block
    ends and deleted when it raises (an error, or SIGTERM or Ctrl-C: see :class:`_Termination`).

    Only a whole run ever stands at ``out``; a run killed outright (SIGKILL) leaves its
    hidden ``.<name>.partial-*`` folder beside it, never a half-written ``out``.
    """
    target = os.path.abspath(out)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.partial-", dir=os.path.dirname(target))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp's folder is private; a run folder is not
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if os.path.isdir(target) and os.listdir(target):
        try:
            _check_out(target, overwrite)
        except CommandError as error:  # another run wrote there meanwhile: keep both
            raise CommandError(f"{error}; this run was written to {staging}") from None
        replaced = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.replaced-", dir=os.path.dirname(target))
        os.rename(target, os.path.join(replaced, "run"))
        os.rename(staging, target)
        shutil.rmtree(replaced, ignore_errors=True)
    else:
        if os.path.isdir(target):
            os.rmdir(target)
        os.rename(staging, target)


# How data without a test split of its own is split when no option says otherwise.
SPLIT_DEFAULTS = {"label_base": None, "test_fraction": 0.2, "split_seed": 0}


def _load_data(spec, options):
    """:class:`~keras_mmfusion.training.Splits` of ``spec`` read and split as ``options``
    (``header``, ``label_base``, ``test_fraction``, ``split_seed``) say."""
    from keras_mmfusion.training import load_splits

    splits = load_splits(spec, seed=options["split_seed"], header=options["header"], label_base=options["label_base"],
                         test_fraction=options["test_fraction"])
    if options["header"] and spec not in BUILT_IN_DATA:
        print(f"{spec}: skipped the header row of every CSV file (--header)", file=sys.stderr)
    return splits


def _test_rows_digest(splits):
    """The SHA-256 of the rows that form a drawn test split (``None`` for data with its own)."""
    if splits.test_rows is None:
        return None
    import hashlib

    import numpy as np

    return hashlib.sha256(np.asarray(splits.test_rows, np.int64).tobytes()).hexdigest()


def _load_model(path):
    """The model of a ``.keras`` file that :func:`_check_model_file` accepted."""
    import keras

    try:
        return keras.saving.load_model(path, safe_mode=True)
    except Exception as error:  # Keras raises ValueError, OSError, zipfile errors ...
        raise CommandError(f"cannot read model file {path}: {str(error).splitlines()[0]}") from None


def _plot_history(history, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in ("loss", "accuracy") if k in history]
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.5))
    for ax, key in zip(list(axes) if len(keys) > 1 else [axes], keys):
        ax.plot(range(1, len(history[key]) + 1), history[key], label="train")
        if f"val_{key}" in history:
            ax.plot(range(1, len(history[f"val_{key}"]) + 1), history[f"val_{key}"], label="validation")
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_residuals(model, inputs, path):
    """Solver residual against iteration for every DEQFusion layer, on ``inputs``."""
    import keras
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from keras_mmfusion._internals import sublayers
    from keras_mmfusion.layers import DEQFusion

    layers = [l for l in sublayers(model) if isinstance(l, DEQFusion)]
    if not layers:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.5))
    traces = {}
    for layer in layers:
        features = keras.Model(model.inputs, layer.input)(inputs)
        _, stats = layer.solve(features)
        trace = stats.trace.numpy()[: int(stats.steps)]
        traces[layer.name] = trace.tolist()
        ax.semilogy(range(1, len(trace) + 1), trace, marker=".", label=layer.name)
    ax.axhline(layers[0].tol, color="grey", linestyle=":", label="tol")
    ax.set_xlabel("solver iteration (evaluations of the update)")
    ax.set_ylabel(f"mean {layers[0].stop_mode} residual")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return traces


def _train_one(args, splits, settings, seed, out, shown):
    """One trial, written to the folder ``out`` (shown to the user as ``shown``); returns its metrics."""
    from keras_mmfusion.training import headline_metrics, model_inputs, run_trial

    stop = [_termination.callback()]
    model, history, metrics = run_trial(splits, args.fusion, seed, settings, verbose=0 if args.quiet else 1,
                                        callbacks=stop, refit_callbacks=stop)
    _termination.check()
    os.makedirs(out, exist_ok=True)
    model.save(os.path.join(out, "model.keras"))
    history = {k: [float(v) for v in vals] for k, vals in history.items()}
    with open(os.path.join(out, "history.json"), "w") as f:
        json.dump(history, f, indent=2)
    _plot_history(history, os.path.join(out, "training_curves.png"))
    traces = _plot_residuals(model, model_inputs(model, splits.test[0]), os.path.join(out, "solver_residuals.png"))
    data_source = args.data if args.data in BUILT_IN_DATA else os.path.abspath(args.data)
    metrics.update(data=splits.name, data_source=data_source, data_header=args.header, fusion=args.fusion, seed=seed,
                   settings=vars(settings), units_chosen_by="--units" if args.units else "units_for")
    if splits.test_rows is not None:
        metrics.update(data_label_base=args.label_base, data_test_fraction=args.test_fraction,
                       data_split_seed=args.split_seed, data_test_rows_sha256=_test_rows_digest(splits))
    if traces:
        metrics["solver_residual_trace"] = traces
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    keys = headline_metrics(splits.num_classes) + ("best_epoch", "epochs_run")
    print(_table({k: metrics[k] for k in keys}))
    print(f"wrote {shown}/model.keras, history.json, metrics.json and plots")
    return metrics


def _check_train_arguments(args):
    """The number and range checks of ``train``'s options, and ``--fusion-options`` parsed
    into a dict, before TensorFlow is imported."""
    for option in ("seeds", "epochs", "units", "batch_size"):
        if getattr(args, option) is not None and getattr(args, option) < 1:
            raise CommandError(f"--{option.replace('_', '-')} must be at least 1, got {getattr(args, option)}")
    if args.patience < 0:
        raise CommandError(f"--patience must be >= 0 (0: no early stopping), got {args.patience}")
    if not args.lr > 0:
        raise CommandError(f"--lr must be > 0, got {args.lr}")
    if not args.modality_weight >= 0:
        raise CommandError(f"--modality-weight must be >= 0, got {args.modality_weight}")
    for option in ("dropout", "modality_dropout"):
        if not 0 <= getattr(args, option) < 1:
            raise CommandError(f"--{option.replace('_', '-')} must be in [0, 1), got {getattr(args, option)}")
    try:
        options = json.loads(args.fusion_options)
    except json.JSONDecodeError as error:
        raise CommandError(f"--fusion-options is not valid JSON ({error}): {args.fusion_options}") from None
    if not isinstance(options, dict):
        raise CommandError(f"--fusion-options must be a JSON object of keyword arguments, got {args.fusion_options}")
    args.fusion_options = options
    for option, default in SPLIT_DEFAULTS.items():
        if getattr(args, option) is None:
            setattr(args, option, default)
    if not 0 < args.test_fraction < 1:
        raise CommandError(f"--test-fraction must be in (0, 1), got {args.test_fraction}")
    _check_data(args.data)
    _check_out(args.out, args.overwrite)


def cmd_train(args):
    _check_train_arguments(args)
    quiet_tensorflow_import(args.verbose)
    from keras_mmfusion.training import Settings, units_for

    splits = _load_data(args.data, dict(header=args.header, **{k: getattr(args, k) for k in SPLIT_DEFAULTS}))
    units = args.units or units_for(splits.num_classes, splits.widths)
    settings = Settings(units=units, dropout=args.dropout, modality_weight=args.modality_weight,
                        modality_dropout=args.modality_dropout, lr=args.lr,
                        batch_size=args.batch_size, epochs=args.epochs, patience=args.patience, monitor=args.monitor,
                        jit_compile=args.jit, standardize=not args.no_standardize, refit=args.refit,
                        fusion_options=args.fusion_options)
    drawn = "" if splits.test_rows is None else (
        f" (test split: {args.test_fraction:g} of each class, --split-seed {args.split_seed})")
    print(f"data: {splits.name}, {len(splits.widths)} modalities of widths {splits.widths}, "
          f"{len(splits.train[1])} train / {len(splits.test[1])} test samples{drawn}, {splits.num_classes} classes")
    print(f"width of the encoders, fusion and head: {units}"
          + (" (--units)" if args.units else f" (chosen from the data: {splits.num_classes} classes, widest view "
                                              f"{max(splits.widths)}; --units sets it)"))
    with _staged_run(args.out, args.overwrite) as out:
        if args.seeds == 1:
            _train_one(args, splits, settings, args.seed, out, args.out)
        else:
            seeds = list(range(args.seed, args.seed + args.seeds))
            runs = [_train_one(args, splits, settings, s, os.path.join(out, f"seed_{s}"),
                               os.path.join(args.out, f"seed_{s}")) for s in seeds]
            _write_summary(runs, seeds, splits, args, out)
        _termination.check()


def _write_summary(runs, seeds, splits, args, out):
    """Print the mean and spread of several seeds' test metrics and write ``summary.json`` into ``out``."""
    from keras_mmfusion.training import headline_metrics, summarise

    keys = headline_metrics(splits.num_classes)
    summary = summarise(runs, keys)
    print(f"\ntest split, {len(seeds)} seeds ({'refit on all training data' if args.refit else 'best validation epoch'}),"
          " mean +- std")
    print(_table({k: f"{mean:.4f} +- {std:.4f}" for k, (mean, std) in summary.items()}))
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump({"seeds": seeds, "refit": args.refit, "summary": summary}, f, indent=2)
    print(f"wrote {args.out}/summary.json")


def _table(values):
    width = max(len(k) for k in values)
    return "\n".join(f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}"
                     for k, v in values.items())


def cmd_evaluate(args):
    _check_model_file(args.model)
    data, options, digest = _data_of(args)
    if not data:
        raise CommandError("pass --data: the data to evaluate on (no metrics.json with a data source next to "
                           "the model)")
    _check_data(data)
    quiet_tensorflow_import(args.verbose)
    from keras_mmfusion.training import classification_metrics, model_inputs

    model = _load_model(args.model)
    splits = _load_recorded_data(data, options, digest)
    widths = [int(t.shape[-1]) for t in model.inputs if t.name != "modality_mask"]
    if widths != splits.widths:
        raise CommandError(f"the model expects inputs of widths {widths} but {data} has widths {splits.widths}")
    probabilities = model.predict(model_inputs(model, splits.test[0]), batch_size=256, verbose=0)
    metrics = classification_metrics(splits.test[1], probabilities)
    metrics["samples"] = len(splits.test[1])
    print(json.dumps(metrics, indent=2) if args.json else _table(metrics))


# How far an export may be from Keras on held-out samples: the largest absolute difference
# of any output probability for float formats, and for int8 weights (with or without int8
# activations) the fraction of samples whose predicted class changes and the change of
# accuracy.
EXPORT_TOLERANCES = {None: {"max_abs": 1e-3}, "float16": {"max_abs": 2e-2},
                     "dynamic": {"changed": 0.02, "accuracy": 0.01}, "int8": {"changed": 0.02, "accuracy": 0.01}}


def _data_of(args):
    """``(data, options, digest)`` for ``evaluate`` and ``export``: the data and how to read
    and split it (see :func:`_load_data`), from the options or from what ``mmfusion train``
    recorded in ``metrics.json`` next to ``--model``, and the recorded digest of the test
    rows it drew (``None`` when the data had a test split of its own, or when options
    other than the recorded ones were given). ``data`` is ``None`` when neither says."""
    path = os.path.join(os.path.dirname(os.path.abspath(args.model)), "metrics.json")
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError):
        record = {}
    recorded = record.get("data_source")
    data = args.data or recorded
    same = data is not None and recorded is not None and (
        data == recorded or os.path.abspath(data) == os.path.abspath(recorded))
    options = {"header": args.header or (same and bool(record.get("data_header", False)))}
    for option, default in SPLIT_DEFAULTS.items():
        given = getattr(args, option)
        options[option] = given if given is not None else record.get(f"data_{option}", default) if same else default
    digest = record.get("data_test_rows_sha256") if same else None
    if digest is not None and any(getattr(args, o) not in (None, record.get(f"data_{o}")) for o in SPLIT_DEFAULTS):
        digest = None  # another split was asked for
    return data, options, digest


def _load_recorded_data(data, options, digest):
    """:func:`_load_data`, refusing a drawn test split whose rows differ from the recorded ones."""
    splits = _load_data(data, options)
    if digest is not None and _test_rows_digest(splits) != digest:
        raise CommandError(f"the test rows drawn from {data} (--test-fraction {options['test_fraction']:g}, "
                           f"--split-seed {options['split_seed']}) differ from those the model was tested on, as "
                           "recorded in metrics.json: the data changed since training")
    return splits


def _input_list(model, arrays):
    """The list of arrays ``model``'s serving signature takes, one per input (see
    :func:`keras_mmfusion.training.model_inputs`)."""
    from keras_mmfusion.training import model_inputs

    inputs = model_inputs(model, arrays)
    return inputs if isinstance(inputs, list) else [inputs]


def _verify_exported(model, path, splits, quantize, diagnostics):
    """Run the export on the test split in its runtime; returns (report lines, failures)."""
    import numpy as np

    from keras_mmfusion import export

    count = min(256, len(splits.test[1]))
    xs = _input_list(model, [np.asarray(a[:count], np.float32) for a in splits.test[0]])
    labels = splits.test[1][:count]
    reference = export.serving_function(model, diagnostics=True)(*xs)
    got = export.run_export(path, dict(zip(export.input_names(model), xs)))
    name = export.output_names(model)[0]
    expected, actual = reference[name].numpy(), got[name]
    keras_classes, export_classes = np.argmax(expected, -1), np.argmax(actual, -1)
    keras_accuracy, export_accuracy = np.mean(keras_classes == labels), np.mean(export_classes == labels)
    measured = {
        "max_abs": float(np.max(np.abs(actual - expected)[np.isfinite(expected)], initial=0.0)),
        "changed": float(np.mean(export_classes != keras_classes)),
        "accuracy": float(abs(export_accuracy - keras_accuracy)),
    }
    lines = [f"verified on {count} test samples of {splits.name}: max abs difference {measured['max_abs']:.2e}, "
             f"predicted class changed on {measured['changed']:.1%}, accuracy {export_accuracy:.4f} "
             f"(Keras {keras_accuracy:.4f})"]
    failures = [f"{key} {measured[key]:.3g} > {limit:g}" for key, limit in EXPORT_TOLERANCES[quantize].items()
                if measured[key] > limit]
    # A sample whose residual lands within float rounding of tol can converge one step
    # apart in another runtime; quantized weights move the iterates further.
    step_tolerance = 1 if quantize is None else 2
    for key in [k for k in reference if k.endswith("_steps")]:
        layer = key[: -len("_steps")]
        keras_steps = int(reference[key][0])
        if diagnostics:
            steps = int(got[key][0])
            lines.append(f"{layer}: {steps} solver steps, Keras {keras_steps}")
            if abs(steps - keras_steps) > step_tolerance:
                failures.append(f"{layer} took {steps} solver steps, Keras {keras_steps}")
        else:
            lines.append(f"{layer}: Keras took {keras_steps} solver steps (export with --diagnostics to compare)")
    return lines, failures


def cmd_export(args):
    _check_model_file(args.model)
    if args.quantize and args.format != "tflite":
        raise CommandError("--quantize applies to --format tflite only")
    if args.strip_names and args.format != "tflite":
        raise CommandError("--strip-names applies to --format tflite only")
    data, options, digest = _data_of(args)
    if not data:
        raise CommandError("pass --data: the data to verify the export on (no metrics.json with a data source "
                           "next to the model)")
    if args.quantize == "int8" and not args.data:
        raise CommandError("--quantize int8 needs calibration data: pass --data with the model's training data")
    _check_data(data)
    quiet_tensorflow_import(args.verbose)
    from keras_mmfusion import export

    model = _load_model(args.model)
    splits = _load_recorded_data(data, options, digest)
    stem = os.path.splitext(args.model)[0]
    options = dict(overwrite=args.overwrite, diagnostics=args.diagnostics)
    if args.format == "saved_model":
        out = export.to_saved_model(model, args.out or f"{stem}_serving", **options)
    elif args.format == "onnx":
        out = export.to_onnx(model, args.out or f"{stem}.onnx", **options)
    else:
        representative = None
        if args.quantize == "int8":
            x = _input_list(model, splits.train[0])
            representative = ([a[i : i + 1] for a in x] for i in range(min(300, len(x[0]))))
        suffix = f"_{args.quantize}" if args.quantize else ""
        out = export.to_tflite(model, args.out or f"{stem}{suffix}.tflite", quantize=args.quantize,
                               representative_data=representative, builtins_only=not args.allow_flex,
                               strip_names=args.strip_names, **options)
        report = export.tflite_report(out)
        print(f"ops: {', '.join(report['ops'])}")
        print(f"size: {report['size_bytes']} bytes")
    print(f"wrote {out}")
    lines, failures = _verify_exported(model, out, splits, args.quantize, args.diagnostics)
    print("\n".join(lines))
    if failures:
        print(f"verification failed: {'; '.join(failures)}", file=sys.stderr)
        return 1
    return 0


def cmd_bench(args):
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "benchmarks")
    script = os.path.join(root, BENCHMARKS[args.name])
    if not os.path.isfile(script):
        raise CommandError(f"benchmark script not found: {script} (benchmarks live in the source checkout)")
    extra = [a for a in args.args if a != "--"]
    return subprocess.call([sys.executable, script, *extra])


COMMANDS = {"train": cmd_train, "evaluate": cmd_evaluate, "export": cmd_export, "bench": cmd_bench}


class _Termination:
    """SIGTERM or Ctrl-C (SIGINT) during ``mmfusion train``, turned into ``SystemExit(128 +
    signal number)`` where raising is safe, so that the run being written is deleted (see
    :func:`_staged_run`).

    TensorFlow's ops check for signals while they run (creating ``fit``'s dataset iterator
    at the start of every epoch does), and an exception raised from the handler inside
    one can corrupt the process's heap: about one run in a hundred stopped at the start of
    an epoch aborted (``free(): invalid next size``) and left its staging folder behind.
    So the handler only records the signal and says so on stderr. During ``fit``,
    :meth:`callback` ends training at the end of the current batch and raises when ``fit``
    ends; between the command's stages, :meth:`check` raises. A second signal raises at
    once.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum = None

    def handle(self, signum, frame):
        if self.signum is not None:
            sys.exit(128 + signum)
        self.signum = signum
        again = "Ctrl-C" if signum == signal.SIGINT else "the signal"
        print(f"\nmmfusion: {signal.Signals(signum).name}: stopping at the end of the current batch or stage "
              f"and deleting the unfinished run ({again} again stops at once)", file=sys.stderr, flush=True)

    def check(self):
        if self.signum is not None:
            sys.exit(128 + self.signum)

    def callback(self):
        """A Keras callback that stops ``fit`` at the end of the batch in which the signal
        came, and raises when ``fit`` ends."""
        import keras

        termination = self

        class StopOnSignal(keras.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                if termination.signum is not None:
                    self.model.stop_training = True

            def on_train_end(self, logs=None):
                termination.check()

        return StopOnSignal()


_termination = _Termination()


def main(argv=None):
    try:
        args = build_parser().parse_args(argv)
        previous = {}
        if args.command == "train" and threading.current_thread() is threading.main_thread():
            _termination.signum = None
            previous = {signum: signal.signal(signum, _termination.handle) for signum in _Termination.SIGNALS}
        try:
            return COMMANDS[args.command](args) or 0
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
    except CommandError as error:
        message = str(error)
    except Exception as error:  # data, export and argument errors from the library
        from keras_mmfusion.datasets.tabular import DataError
        from keras_mmfusion.export import ExportError

        if not isinstance(error, (DataError, ExportError, ValueError, OSError)):
            raise
        message = str(error).splitlines()[0]
    print(f"mmfusion: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

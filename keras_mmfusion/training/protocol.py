"""One honest training run: data splits, a classifier, validation-based selection, a test score.

The ``mmfusion`` command, ``examples/rosmap.py`` and the fusion benchmark all run their
trials through :func:`run_trial`, so they follow the same protocol: a stratified
validation split carved from the training data, early stopping and best-epoch
selection on validation only, and one evaluation of the test split at the end.
"""

import dataclasses
import json
import math
import os

import keras
import numpy as np

from keras_mmfusion.datasets import load_modalities, load_multiomics, make_synthetic, mogonet_folder, stratified_split
from keras_mmfusion.datasets.mat import load_mat
from keras_mmfusion.datasets.multiomics import find_views
from keras_mmfusion.datasets.tabular import DataError, check_classes, check_splits
from keras_mmfusion.models import build_classifier, build_reference_classifier, make_fusion
from keras_mmfusion.training.fitting import fit_classifier
from keras_mmfusion.training.scores import classification_metrics

@dataclasses.dataclass
class Splits:
    """Train and test data, each a ``(list of (n, d_i) arrays, labels)`` pair.

    ``test_rows`` holds the rows of the source data that form the test split when
    :func:`load_splits` draws it (data without a test split of its own), else ``None``.
    """

    train: tuple
    test: tuple
    num_classes: int
    name: str
    test_rows: np.ndarray = None

    @property
    def widths(self):
        return [a.shape[1] for a in self.train[0]]


@dataclasses.dataclass
class Settings:
    """Model and training settings of a trial.

    With ``refit``, the validation split only chooses the number of epochs (the best
    epoch); a fresh model with the same seed is then trained for that many epochs on all
    of the training data, standardised with all of it, and that model is tested.
    ``modality_weight`` > 0 trains fusion models with a softmax head on every
    modality's encoder as well (see :func:`keras_mmfusion.training.compile_classifier`);
    one-modality models have no such heads.

    With ``modality_mask``, the classifier takes a ``modality_mask`` input (see
    :func:`keras_mmfusion.models.build_classifier`); the trial feeds it all True (see
    :func:`model_inputs`), as its data have every modality, and the returned model can
    then be evaluated with modalities absent. ``modality_dropout`` > 0 drops whole
    modalities at random in training; it implies ``modality_mask``.

    With ``standardize``, the classifier scales its inputs with the training part's
    statistics, as ``scaling`` says: ``"standardize"`` (mean and variance) or
    ``"min_max"`` (minimum and range).

    ``weight_decay`` (coupled L2 on every trainable variable, added after clipping),
    ``clipnorm`` (of the global norm), ``adam_epsilon`` (``None``: Keras's 1e-7),
    ``torch_epsilon`` (Adam's epsilon placed as PyTorch places it), ``loss_weight``
    (the weight of the classifier's cross-entropy),
    ``lr_decay_every`` and ``lr_decay_factor`` go to
    :func:`~keras_mmfusion.training.fit_classifier`; ``patience=0`` runs all
    ``epochs`` and still keeps the best one. ``fusion_options`` are keyword arguments of
    the fusion layer, ``model_options`` further keyword arguments of the classifier's
    builder (for the reference classifier, e.g. ``gate_weight``).
    """

    units: int = 32
    dropout: float = 0.0
    l2: float = 0.0
    lr: float = 1e-3
    batch_size: int = 32
    epochs: int = 100
    patience: int = 20
    validation_fraction: float = 0.2
    monitor: str = "val_loss"
    jit_compile: bool = False
    standardize: bool = True
    scaling: str = "standardize"
    refit: bool = False
    modality_weight: float = 0.0
    modality_mask: bool = False
    modality_dropout: float = 0.0
    fusion_options: dict = dataclasses.field(default_factory=dict)
    model_options: dict = dataclasses.field(default_factory=dict)
    weight_decay: float = 0.0
    clipnorm: float = 0.0
    lr_decay_every: int = 0
    lr_decay_factor: float = 0.2
    loss_weight: float = 1.0
    adam_epsilon: float = None
    torch_epsilon: bool = False

    @property
    def takes_mask(self):
        """Whether the classifier has a ``modality_mask`` input."""
        return self.modality_mask or self.modality_dropout > 0


# The width rule's bounds: the recipe's ROSMAP width below, a width past which the
# standard classifier's layers only add parameters above.
SMALLEST_UNITS, LARGEST_UNITS = 8, 128


def units_for(num_classes, widths):
    """The width of the standard classifier's encoders, fusion and head, chosen from the data.

    Four units per class, rounded up to a power of two (``4 * 2**ceil(log2(k))``), within
    ``[8, 128]``, and no wider than the widest view rounded up to a power of two. Two
    classes give 8, the width chosen on ROSMAP's validation splits (``RECIPE``), so ROSMAP
    keeps its recipe; 15 classes give 64, and 68 or 100 classes 128. The width grows with
    the classes because a narrow head cannot separate many of them (docs/guide.md, "The
    training recipes").

    Args:
        num_classes: the number of classes ``k``.
        widths: each view's number of features.

    Returns:
        An int.
    """
    per_class = 4 * 2 ** math.ceil(math.log2(max(num_classes, 2)))
    widest = 2 ** math.ceil(math.log2(max(widths)))
    return int(max(SMALLEST_UNITS, min(per_class, LARGEST_UNITS, widest)))


def _read_recipe():
    # Kept as data so that the `mmfusion` command shows these defaults in --help without
    # importing the package (see keras_mmfusion_cli).
    with open(os.path.join(os.path.dirname(__file__), "recipe.json")) as f:
        return json.load(f)


_RECIPES = _read_recipe()
# The recipe of the README's ROSMAP results; `mmfusion train` and examples/rosmap.py default to it.
RECIPE = Settings(**_RECIPES["settings"])
# The ROSMAP recipe of the official code of DEQ fusion (Ni et al., arXiv 2306.16645; the
# paper itself reports no ROSMAP figure) for the reference classifier, with that code's
# values: width 300, full-batch Adam 1e-4 (epsilon 1e-8, placed as PyTorch places it)
# with coupled weight decay 1e-4 added after the gradient's global norm is clipped at 30,
# x0.2 after 500 epochs, and its loss: the running total is multiplied by 1.5 once per
# view, so with three views it is 3.375 times the cross-entropy (loss_weight), plus
# 2.25, 1.5 and 1 times the gate and confidence losses of views 1, 2 and 3, plus 20
# times the Jacobian penalty (2 probes). DEQ fusion as that code solves it: 4 GroupNorm
# groups, the plain sum as the fused injection, the DEQ reference code's Anderson
# (30 evaluations, whole-batch absolute residual 1e-5), an adjoint solve of 31
# evaluations from zero (whole-batch relative residual 1e-5), f(z*) as the training
# output, the update's kernels initialised as PyTorch's Linear layers, and every other
# kernel drawn from PyTorch's untruncated Xavier normal.
REFERENCE_RECIPE = Settings(**_RECIPES["reference"])
# The reference recipe with two changes chosen on the ROSMAP validation splits: a 64-wide
# DEQ state (``DEQFusion(units=64)``, which projects the 300-wide encodings to it) and 60
# solver steps instead of 30 (docs/guide.md, "The training recipes").
REFERENCE_NARROW_RECIPE = dataclasses.replace(
    REFERENCE_RECIPE, fusion_options={**REFERENCE_RECIPE.fusion_options, "units": 64, "max_iter": 60}
)


def load_splits(spec, seed=0, header=False, label_base=None, test_fraction=0.2):
    """Data by name or path.

    Args:
        spec: ``"synthetic"`` (the built-in default), ``"rosmap"`` (``$MMFUSION_ROSMAP``,
            else downloaded once; see :func:`keras_mmfusion.datasets.mogonet_folder`), a folder in the MOGONET layout (``1_tr.csv``,
            ``1_te.csv``, ..., ``labels_tr.csv``, ``labels_te.csv``), a folder
            with one ``.csv``/``.npy`` file per modality plus ``labels.csv`` or
            ``labels.npy``, or a multi-view ``.mat`` file (see
            :func:`keras_mmfusion.datasets.load_mat`). The last two have no test split:
            ``test_fraction`` of every class, drawn with ``seed``, becomes it.
        seed: the seed of that test split.
        header: whether every CSV file of a folder starts with a header row to skip.
        label_base: for a ``.mat`` file, the number of its first class (see
            :func:`~keras_mmfusion.datasets.load_mat`).
        test_fraction: the share of the samples held out as the test split, in ``(0, 1)``.

    Returns:
        :class:`Splits`.
    """
    if spec == "synthetic":
        x, y = make_synthetic(4000, num_modalities=3, widths=32, seed=0)
        return Splits(([a[:3000] for a in x], y[:3000]), ([a[3000:] for a in x], y[3000:]), 2, "synthetic")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}.")
    if os.fspath(spec).endswith(".mat"):
        x, y = load_mat(spec, label_base=label_base, verbose=0)
        name = os.path.splitext(os.path.basename(spec))[0]
        return _held_out_test(x, y, check_classes([y], [os.path.basename(spec)]), name, test_fraction, seed)
    folder = mogonet_folder("rosmap") if spec == "rosmap" else spec
    if not os.path.isdir(folder):
        raise DataError(f"{folder}: data folder not found (expected 'synthetic', 'rosmap' or a folder).")
    name = "rosmap" if spec == "rosmap" else os.path.basename(os.path.normpath(folder))
    if os.path.isfile(os.path.join(folder, "labels_tr.csv")):
        train = load_multiomics(folder, "train", header=header)
        test = load_multiomics(folder, "test", header=header)
        files = [(f"{v}_tr.csv", f"{v}_te.csv") for v in find_views(folder)]
        num_classes = check_splits(train, test, ("labels_tr.csv", "labels_te.csv"), files)
        return Splits(train, test, num_classes, name)
    files = sorted(os.listdir(folder))
    labels = [f for f in files if f in ("labels.csv", "labels.npy")]
    modalities = [os.path.join(folder, f) for f in files if f.endswith((".csv", ".npy")) and f not in labels]
    if not labels or len(modalities) < 2:
        raise DataError(
            f"{folder}: expected the MOGONET layout (N_tr.csv, labels_tr.csv, ...) or at least two "
            "modality files (.csv/.npy) plus labels.csv or labels.npy."
        )
    x, y = load_modalities(modalities, os.path.join(folder, labels[0]), header=header)
    return _held_out_test(x, y, check_classes([y], [labels[0]]), name, test_fraction, seed)


def _held_out_test(x, y, num_classes, name, test_fraction, seed):
    """:class:`Splits` of data without a test split: a stratified ``test_fraction`` is held out."""
    keep, held = stratified_split(y, test_fraction, seed)
    return Splits(([a[keep] for a in x], y[keep]), ([a[held] for a in x], y[held]), num_classes, name, held)


def select_views(splits, views):
    """The same splits restricted to the modality indices ``views``."""
    pick = lambda part: ([part[0][v] for v in views], part[1])  # noqa: E731
    return Splits(pick(splits.train), pick(splits.test), splits.num_classes, splits.name)


def build_model(fusion_name, splits, settings, input_names=None, train_inputs=None):
    """The standard classifier around the named fusion (``"single"``: one modality, no fusion;
    ``"reference"``: :func:`keras_mmfusion.models.build_reference_classifier`).

    With ``settings.standardize``, every modality is scaled with the per-feature
    statistics of ``train_inputs`` (default: all of ``splits.train``), as
    ``settings.scaling`` says (``"standardize"`` or ``"min_max"``; see
    :func:`keras_mmfusion.models.build_classifier`).
    """
    if settings.standardize:
        standardize_with = splits.train[0] if train_inputs is None else train_inputs
    else:
        standardize_with = None
    if fusion_name in ("reference", "single") and settings.takes_mask:
        raise ValueError(f"The {fusion_name!r} classifier takes no modality_mask; modality_mask and "
                         "modality_dropout apply to the fusion classifiers.")
    if fusion_name == "reference":
        return build_reference_classifier(
            splits.widths, splits.num_classes, units=settings.units, dropout=settings.dropout,
            fusion_options=settings.fusion_options, input_names=input_names, standardize_with=standardize_with,
            scaling=settings.scaling, **settings.model_options,
        )
    fusion = None
    if fusion_name != "single":
        fusion = make_fusion(fusion_name, settings.units, num_modalities=len(splits.widths),
                             **settings.fusion_options)
    return build_classifier(
        fusion, splits.widths, splits.num_classes, encoder_units=settings.units, head_units=settings.units,
        dropout=settings.dropout, l2=settings.l2, input_names=input_names, standardize_with=standardize_with,
        modality_mask=settings.takes_mask, modality_dropout=settings.modality_dropout, scaling=settings.scaling,
        **settings.model_options,
    )


def model_inputs(model, arrays):
    """What ``model`` is called on for the modality ``arrays``: the one array of a
    one-input model, else the list of arrays, followed by an all-True ``modality_mask``
    when the model has that input (see :func:`keras_mmfusion.models.build_classifier`)."""
    arrays = list(arrays)
    if [t.name for t in model.inputs][-1] == "modality_mask":
        arrays.append(np.ones((len(arrays[0]), len(arrays)), bool))
    return arrays if len(arrays) > 1 else arrays[0]


def fit_options(settings):
    """The keyword arguments of :func:`~keras_mmfusion.training.fit_classifier` that
    ``settings`` chooses for every model it trains (batch size, optimiser, schedule)."""
    return dict(batch_size=settings.batch_size, lr=settings.lr, jit_compile=settings.jit_compile,
                weight_decay=settings.weight_decay, clipnorm=settings.clipnorm,
                lr_decay_every=settings.lr_decay_every, lr_decay_factor=settings.lr_decay_factor,
                epsilon=settings.adam_epsilon, torch_epsilon=settings.torch_epsilon, loss_weight=settings.loss_weight)


def run_trial(splits, fusion_name, seed, settings, verbose=0, callbacks=(), refit_callbacks=()):
    """Train on a validation split of ``splits.train``, pick the best epoch, test once.

    With ``settings.refit``, the tested model is retrained on all of ``splits.train``
    for the chosen number of epochs (see :class:`Settings`).

    Args:
        callbacks: further Keras callbacks of the fit on the validation split (see
            :func:`~keras_mmfusion.training.fit_classifier`).
        refit_callbacks: further Keras callbacks of the refit, which has no validation
            data.

    Returns:
        ``(model, history, metrics)`` with test ``accuracy``, ``f1``, ``auc``, the
        best validation value, the epochs run and the median seconds per epoch, the
        accuracy at the kept epoch on the training part (``fit_accuracy``, as ``fit``
        logs it: over the epoch, with dropout on) and on the validation split
        (``validation_accuracy``); for a DEQ
        model also the converged fractions of its training solves over the last 10 epochs
        of the run on the validation split (see :func:`converged_last_10`).
    """
    keras.utils.set_random_seed(seed)
    keep, held = stratified_split(splits.train[1], settings.validation_fraction, seed)
    train_part = [a[keep] for a in splits.train[0]]
    model = build_model(fusion_name, splits, settings, train_inputs=train_part)
    train = (model_inputs(model, train_part), splits.train[1][keep])
    val = (model_inputs(model, [a[held] for a in splits.train[0]]), splits.train[1][held])
    # The reference classifier has its own per-modality heads; a single modality has none.
    modality_weight = settings.modality_weight if fusion_name not in ("single", "reference") else 0.0
    fit = dict(fit_options(settings), modality_weight=modality_weight, verbose=verbose)
    history, timer = fit_classifier(model, train, settings.epochs, val, patience=settings.patience,
                                    monitor=settings.monitor, callbacks=callbacks, **fit)
    monitored = history[settings.monitor]
    best_epoch = int(np.argmin(monitored) if "loss" in settings.monitor else np.argmax(monitored)) + 1
    if settings.refit:
        keras.utils.set_random_seed(seed)
        model = build_model(fusion_name, splits, settings)
        fit_classifier(model, (model_inputs(model, splits.train[0]), splits.train[1]), best_epoch,
                       callbacks=refit_callbacks, **fit)
    probabilities = model.predict(model_inputs(model, splits.test[0]), batch_size=256, verbose=0)
    metrics = classification_metrics(splits.test[1], probabilities)
    metrics.update(
        best_validation=float(monitored[best_epoch - 1]),
        best_epoch=best_epoch,
        epochs_run=len(timer.times),
        epoch_seconds=float(np.median(timer.times)),
        params=int(model.count_params()),
    )
    # The fused head's accuracy at the kept epoch: on the training part as fit logs it
    # (over the epoch, under dropout), and on the validation split.
    for key, name in (("accuracy", "fit_accuracy"), ("val_accuracy", "validation_accuracy")):
        if key in history:
            metrics[name] = float(history[key][best_epoch - 1])
    metrics.update(converged_last_10(history))
    return model, history, metrics


def converged_last_10(history):
    """For a DEQ model's training history, ``converged_last_10`` and
    ``converged_last_10_lowest``, the mean and the lowest per-epoch fraction of training
    samples whose forward solve converged over the last 10 epochs, and
    ``backward_converged_last_10`` and ``backward_converged_last_10_lowest``, the same
    of the adjoint solves; ``{}`` for a model without solves."""
    out = {}
    for prefix, backward in (("", False), ("backward_", True)):
        converged = [history[k][-10:] for k in converged_keys(history, backward)]
        if converged:
            out[f"{prefix}converged_last_10"] = float(np.mean(converged))
            out[f"{prefix}converged_last_10_lowest"] = float(np.min(converged))
    return out


def converged_keys(logs, backward=False):
    """The keys of ``logs`` (or a history) that hold the converged fraction of training
    solves: ``deq_converged``, or ``<layer name>_deq_converged`` per layer, not ``val_``;
    with ``backward=True`` those of the adjoint solves, ``deq_backward_converged``."""
    return [k for k in logs if k.endswith("converged") and not k.startswith("val_")
            and k.endswith("backward_converged") == backward]


def summarise(runs, keys=("accuracy", "f1_binary", "auc")):
    """``{key: (mean, std)}`` over a list of metric dicts (by default the two-class headline
    metrics; see :func:`keras_mmfusion.training.headline_metrics`)."""
    return {k: (float(np.mean([r[k] for r in runs])), float(np.std([r[k] for r in runs]))) for k in keys}

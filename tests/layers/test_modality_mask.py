"""Missing modalities: every fusion layer's ``modality_mask``, and ModalityDropout."""

import numpy as np
import pytest
import tensorflow as tf
import keras

import keras_mmfusion as mmf
from keras_mmfusion.layers import (ConcatFusion, DEQFusion, DenseFusion, DynamicFusion, GatedFusion,
                                   LowRankTensorFusion, ModalityDropout, SumFusion, TensorFusion, ZeroAbsent)
from keras_mmfusion.training import build_before_tracing

from helpers import random_inputs

WIDTHS = (4, 6, 5)
# Sample rows: all present, each one absent, two absent.
MASK = np.array([[1, 1, 1], [0, 1, 1], [1, 0, 1], [1, 1, 0], [1, 0, 0], [0, 0, 1]], bool)

LAYERS = {
    "concat": lambda: ConcatFusion(8, activation="relu"),
    "sum": lambda: SumFusion(8, mode="mean", activation="relu"),
    "gated": lambda: GatedFusion(8),
    "tensor": lambda: TensorFusion(8),
    "lowrank": lambda: LowRankTensorFusion(8),
    "dmf": lambda: DenseFusion(8, depth=2),
    "deq": lambda: DEQFusion(8, max_iter=30),
    # A plain expert on modality 0 and a fusion-layer expert on all three.
    "dynmm": lambda: DynamicFusion([keras.layers.Dense(8), ConcatFusion(8)], expert_inputs=[[0], [0, 1, 2]],
                                   hard_inference=False),
}


def absent_replaced(xs, mask, value):
    return [np.where(mask[:, i : i + 1], x, value).astype(x.dtype) for i, x in enumerate(xs)]


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_absent_values_reach_nothing_in_the_output_or_the_gradients(name):
    keras.utils.set_random_seed(0)
    layer = LAYERS[name]()
    xs = random_inputs(batch=len(MASK), widths=WIDTHS, seed=1)
    noise = absent_replaced(random_inputs(batch=len(MASK), widths=WIDTHS, seed=2), ~MASK, 0.0)
    reference = layer(xs, modality_mask=MASK).numpy()
    for other in (absent_replaced(xs, MASK, np.nan), [x + n for x, n in zip(xs, noise)]):
        np.testing.assert_array_equal(layer(other, modality_mask=MASK).numpy(), reference)
    # Without the mask the absent values do change the output: the check above can fail.
    assert not np.allclose(layer(xs).numpy()[1:], reference[1:])
    tensors = [tf.constant(x) for x in xs]
    with tf.GradientTape() as tape:
        tape.watch(tensors)
        loss = tf.reduce_sum(tf.square(layer(tensors, modality_mask=MASK, training=True)))
    for i, grad in enumerate(tape.gradient(loss, tensors)):
        grad = grad.numpy()
        assert np.all(grad[~MASK[:, i]] == 0), (name, i)
        assert np.any(grad[MASK[:, i]] != 0), (name, i)


def test_deq_with_a_modality_absent_is_the_equilibrium_model_of_the_others():
    """Modality 1 absent everywhere: the same solve, step for step, as a two-modality
    DEQFusion carrying the weights of modalities 0 and 2."""
    xs = random_inputs(batch=6, widths=WIDTHS, seed=3, dtype="float64")
    options = dict(units=8, max_iter=40, tol=1e-8, dtype="float64")
    full, reduced = DEQFusion(**options), DEQFusion(**options)
    full.build([(None, w) for w in WIDTHS])
    reduced.build([(None, WIDTHS[0]), (None, WIDTHS[2])])
    rng = np.random.default_rng(0)
    full.set_weights([w + 0.05 * rng.normal(size=w.shape) for w in full.get_weights()])
    for kept, source in enumerate((0, 2)):
        reduced.projections[kept].set_weights(full.projections[source].get_weights())
        reduced.modality_blocks[kept].set_weights(full.modality_blocks[source].get_weights())
    reduced.fusion_block.set_weights(full.fusion_block.get_weights())
    reduced.injection_weights.assign(full.injection_weights.numpy()[[0, 2]])
    reduced.injection_bias.assign(full.injection_bias.numpy())
    mask = np.array([[True, False, True]] * 6)
    got, got_stats = full.solve(xs, modality_mask=mask)
    want, want_stats = reduced.solve([xs[0], xs[2]])
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=0, atol=1e-12)
    assert int(got_stats.steps) == int(want_stats.steps) > 3
    np.testing.assert_allclose(got_stats.trace.numpy(), want_stats.trace.numpy(), rtol=1e-9, atol=0)
    # The absent modality does count without the mask.
    assert not np.allclose(full.solve(xs)[0].numpy(), want.numpy(), atol=1e-3)


def test_sum_and_gated_combine_the_present_modalities_only():
    xs = random_inputs(batch=len(MASK), widths=WIDTHS, seed=4)
    present = MASK.astype("float32")
    mean = SumFusion(8, mode="mean")
    out = mean(xs, modality_mask=MASK).numpy()
    parts = np.stack([p(x).numpy() for p, x in zip(mean.projections, xs)], axis=1)
    want = (parts * present[:, :, None]).sum(axis=1) / present.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)

    gated = GatedFusion(8)
    out = gated(xs, modality_mask=MASK).numpy()
    zeroed = absent_replaced(xs, MASK, 0.0)
    logits = gated.gate(np.concatenate(zeroed, axis=-1)).numpy().reshape(len(MASK), 3, 8)
    weights = np.exp(logits) * present[:, :, None]
    weights /= weights.sum(axis=1, keepdims=True)
    candidates = np.stack([c(x).numpy() for c, x in zip(gated.candidates, zeroed)], axis=1)
    np.testing.assert_allclose(out, (weights * candidates).sum(axis=1), rtol=1e-5, atol=1e-6)


def test_dmf_shared_layers_read_the_present_modalities_only():
    """Masking modality 2 equals zeroing its columns in every shared layer's input."""
    xs = random_inputs(batch=6, widths=WIDTHS, seed=5)
    layer = DenseFusion(8, depth=2)
    layer(xs)
    # Non-zero biases, so that a zero input does not give a zero level output.
    layer.set_weights([w + 0.1 for w in layer.get_weights()])
    mask = np.array([[True, True, False]] * 6)
    masked = layer(xs, modality_mask=mask).numpy()
    for shared in layer.shared:
        kernel = shared.kernel.numpy()
        kernel[16:] = 0.0  # rows of modality 2's level output (width 8 per modality)
        shared.kernel.assign(kernel)
    np.testing.assert_allclose(layer(xs).numpy(), masked, rtol=1e-6, atol=1e-6)


def fixed_gate(logits):
    """A gate that ignores its input and returns ``logits`` for every sample."""
    return keras.layers.Dense(len(logits), kernel_initializer="zeros", trainable=False,
                              bias_initializer=keras.initializers.Constant(logits))


class PlainConcat(keras.layers.Layer):
    """An expert on several modalities that takes no mask: it needs all of them."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(8)

    def build(self, input_shape):
        self.dense.build((None, sum(s[-1] for s in input_shape)))

    def call(self, inputs):
        return self.dense(keras.ops.concatenate(inputs, axis=-1))

    def compute_output_shape(self, input_shape):
        return (input_shape[0][0], 8)


def test_dynmm_never_routes_to_an_expert_that_needs_an_absent_modality():
    # Expert 0 reads modality 0; expert 1, a fusion layer, reads 1 and 2 and takes
    # their mask, so it needs one of them; expert 2, a plain layer, needs all three.
    # The gate prefers expert 2, then 0, then 1.
    experts = [keras.layers.Dense(8), ConcatFusion(8), PlainConcat()]
    layer = DynamicFusion(experts, gate=fixed_gate([2.0, 1.0, 3.0]), expert_inputs=[[0], [1, 2], [0, 1, 2]],
                          straight_through=False)
    xs = random_inputs(batch=len(MASK), widths=WIDTHS, seed=6)
    layer(xs, training=False)
    np.testing.assert_array_equal(layer.last_routing.numpy(), [2] * len(MASK))
    layer(xs, modality_mask=MASK, training=False)
    np.testing.assert_array_equal(layer.last_routing.numpy(), [2, 1, 0, 0, 0, 1])
    # In training the soft weights of ineligible experts are exactly 0: the samples
    # without modality 0 do not depend on expert 0's weights; the others do.
    before = layer(xs, modality_mask=MASK, training=True).numpy()
    experts[0].kernel.assign(experts[0].kernel * 3.0)
    after = layer(xs, modality_mask=MASK, training=True).numpy()
    np.testing.assert_array_equal(after[[1, 5]], before[[1, 5]])
    assert not np.allclose(after[[0, 2, 3, 4]], before[[0, 2, 3, 4]])


def test_dynmm_gate_sees_which_modalities_are_present():
    layer = LAYERS["dynmm"]()
    xs = random_inputs(batch=4, widths=WIDTHS, seed=7)
    zeroed = absent_replaced(xs, np.array([[True, False, True]] * 4), 0.0)
    layer(zeroed)
    rng = np.random.default_rng(0)
    layer.presence_logits.assign(rng.normal(size=layer.presence_logits.shape))  # as after training
    present = layer.gate_logits(zeroed).numpy()
    absent = layer.gate_logits(zeroed, np.array([[1.0, 0.0, 1.0]] * 4, "float32")).numpy()
    assert not np.allclose(present, absent)


BAD_MASKS = [
    (MASK.astype("int32"), "must be boolean"),
    (MASK[:, :2], r"must have shape \(batch, 3\)"),
    (MASK[:, 0], r"must have shape \(batch, 3\)"),
    (MASK[:4], "batch size 4 but the inputs have batch size 6"),
    (np.array([[1, 1, 1]] * 5 + [[0, 0, 0]], bool), r"at least one modality present.*samples \[5\]"),
]


@pytest.mark.parametrize("name", sorted(LAYERS))
@pytest.mark.parametrize("mask, message", BAD_MASKS, ids=["dtype", "columns", "rank", "batch", "empty"])
def test_bad_masks_give_a_value_error_that_names_the_problem(name, mask, message):
    xs = random_inputs(batch=len(MASK), widths=WIDTHS, seed=8)
    layer = LAYERS[name]()
    layer.build([x.shape for x in xs])  # the masks are checked before the layer computes anything
    with pytest.raises(ValueError, match=message):
        layer(xs, modality_mask=mask)


def test_a_sample_without_modalities_stops_a_compiled_predict_with_the_message():
    inputs = [keras.Input((w,)) for w in WIDTHS]
    mask = keras.Input((3,), dtype="bool")
    model = keras.Model(inputs + [mask], ConcatFusion(4)(inputs, modality_mask=mask))
    xs = random_inputs(batch=6, widths=WIDTHS, seed=9)
    empty = np.array([[1, 1, 1]] * 5 + [[0, 0, 0]], bool)
    with pytest.raises(tf.errors.InvalidArgumentError, match="at least one modality present"):
        model.predict(xs + [empty], verbose=0)
    assert np.all(np.isfinite(model.predict(xs + [MASK], verbose=0)))


def test_modality_dropout_drops_at_its_rate_and_keeps_one_present_modality():
    rate, batch = 0.4, 12000
    layer = ModalityDropout(rate, seed=3)
    xs = [np.zeros((batch, w), "float32") for w in WIDTHS]
    mask = layer(xs, training=True).numpy()
    assert mask.dtype == bool and mask.shape == (batch, 3)
    assert mask.any(axis=1).all()
    # Modality m is dropped when its draw is below the rate and it is not the kept
    # (largest-draw) one: rate - rate**3 / 3 with three modalities.
    np.testing.assert_allclose(1.0 - mask.mean(axis=0), rate - rate**3 / 3, atol=0.015)
    given = np.tile(MASK, (batch // len(MASK), 1))
    dropped = layer(xs, modality_mask=given, training=True).numpy()
    assert not np.any(dropped & ~given)  # an absent modality never comes back
    assert dropped.any(axis=1).all()
    np.testing.assert_array_equal(dropped[given.sum(axis=1) == 1], given[given.sum(axis=1) == 1])
    np.testing.assert_array_equal(layer(xs, modality_mask=given).numpy(), given)
    assert layer(xs).numpy().all()


def test_modality_dropout_and_zero_absent_configs_round_trip():
    layer = ModalityDropout(0.25, seed=7, name="drop")
    clone = ModalityDropout.from_config(layer.get_config())
    assert (clone.rate, clone.seed, clone.name) == (0.25, 7, "drop")
    with pytest.raises(ValueError, match=r"rate must be a number in \[0, 1\)"):
        ModalityDropout(1.0)
    out = ZeroAbsent()(absent_replaced(random_inputs(6, WIDTHS), MASK, np.nan), modality_mask=MASK)
    assert all(np.all(np.isfinite(o.numpy())) for o in out)


def test_classifier_with_modality_dropout_trains_saves_and_reloads_in_safe_mode(tmp_path):
    x, y = mmf.make_synthetic(240, widths=list(WIDTHS), seed=2)
    keras.utils.set_random_seed(0)
    model = mmf.models.build_classifier(mmf.models.make_fusion("dmf", 8), WIDTHS, 2, 8, 8, standardize_with=x,
                                        modality_mask=True, modality_dropout=0.3)
    assert [t.name for t in model.inputs][-1] == "modality_mask"
    mask = np.tile(MASK, (40, 1))
    model.compile("adam", "sparse_categorical_crossentropy")
    fed = absent_replaced(x, mask, np.nan) + [mask]
    build_before_tracing(model, fed, y)
    history = model.fit(fed, y, epochs=2, batch_size=32, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    probabilities = model.predict(absent_replaced(x, mask, np.nan) + [mask], verbose=0)
    assert np.all(np.isfinite(probabilities))
    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras", safe_mode=True)
    assert loaded.get_layer("modality_dropout").rate == 0.3
    np.testing.assert_array_equal(loaded.predict(absent_replaced(x, mask, np.nan) + [mask], verbose=0),
                                  probabilities)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_masks_under_mixed_precision_keep_absent_values_out(name, policy):
    keras.mixed_precision.set_global_policy(policy)
    try:
        keras.utils.set_random_seed(0)
        layer = LAYERS[name]()
        xs = random_inputs(batch=len(MASK), widths=WIDTHS, seed=10)
        out = layer(xs, modality_mask=MASK, training=True)
        assert out.dtype == policy.split("_")[1]
        out = out.numpy().astype("float32")
        assert np.all(np.isfinite(out))
        other = layer(absent_replaced(xs, MASK, np.nan), modality_mask=MASK, training=True).numpy()
        np.testing.assert_array_equal(other.astype("float32"), out)
    finally:
        keras.mixed_precision.set_global_policy("float32")

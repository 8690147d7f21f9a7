"""plugins.losses against optax's own functions, masked and unmasked."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from plugins import config_errors, losses

B, C = 6, 5
MASK = np.array([1, 1, 0, 1, 0, 1], bool)
WEIGHTS = np.array([0.5, 2.0, 0.0, 1.0, 3.0, 1.5], np.float32)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def _weighted(per_example, w):
    w = np.asarray(w, np.float32)
    return float(np.sum(w * per_example) / np.sum(w))


def test_softmax_cross_entropy_int_and_one_hot(rng):
    logits = rng.normal(size=(B, C)).astype(np.float32)
    labels = rng.integers(0, C, size=B)
    fn = losses.create(dict(name="softmax_cross_entropy"))
    ref = optax.losses.softmax_cross_entropy_with_integer_labels(logits, labels)
    np.testing.assert_allclose(fn(logits, labels), ref.mean(), rtol=1e-6)
    one_hot = jax.nn.one_hot(labels, C)
    np.testing.assert_allclose(fn(logits, one_hot), ref.mean(), rtol=1e-6)
    np.testing.assert_allclose(fn(logits, labels, weights=MASK), _weighted(ref, MASK), rtol=1e-6)
    np.testing.assert_allclose(
        fn(logits, one_hot, weights=WEIGHTS), _weighted(ref, WEIGHTS), rtol=1e-6
    )


def test_softmax_cross_entropy_probability_targets(rng):
    logits = rng.normal(size=(B, C)).astype(np.float32)
    probs = jax.nn.softmax(rng.normal(size=(B, C)))
    fn = losses.create(ml_collections.ConfigDict(dict(name="softmax_cross_entropy")))
    ref = optax.losses.softmax_cross_entropy(logits, probs)
    np.testing.assert_allclose(fn(logits, probs), ref.mean(), rtol=1e-6)


def test_label_smoothing(rng):
    logits = rng.normal(size=(B, C)).astype(np.float32)
    labels = rng.integers(0, C, size=B)
    fn = losses.create(dict(name="softmax_cross_entropy", label_smoothing=0.1))
    smoothed = optax.losses.smooth_labels(jax.nn.one_hot(labels, C), 0.1)
    ref = optax.losses.softmax_cross_entropy(logits, smoothed)
    np.testing.assert_allclose(fn(logits, labels), ref.mean(), rtol=1e-6)
    np.testing.assert_allclose(fn(logits, jax.nn.one_hot(labels, C)), ref.mean(), rtol=1e-6)
    np.testing.assert_allclose(fn(logits, labels, weights=MASK), _weighted(ref, MASK), rtol=1e-6)
    plain = losses.create(dict(name="softmax_cross_entropy"))(logits, labels)
    assert not np.isclose(fn(logits, labels), plain)


def test_sequence_labels_reduce_per_example(rng):
    logits = rng.normal(size=(B, 3, C)).astype(np.float32)
    labels = rng.integers(0, C, size=(B, 3))
    fn = losses.create(dict(name="softmax_cross_entropy"))
    ref = optax.losses.softmax_cross_entropy_with_integer_labels(logits, labels).mean(axis=1)
    np.testing.assert_allclose(fn.per_example(logits, labels), ref, rtol=1e-6)
    np.testing.assert_allclose(fn(logits, labels, weights=MASK), _weighted(ref, MASK), rtol=1e-6)
    token_mask = rng.integers(0, 2, size=(B, 3)).astype(bool)
    token_ref = optax.losses.softmax_cross_entropy_with_integer_labels(logits, labels)
    np.testing.assert_allclose(
        fn(logits, labels, weights=token_mask), _weighted(token_ref, token_mask), rtol=1e-6
    )


@pytest.mark.parametrize(
    "config, ref",
    [
        (dict(name="sigmoid_binary_cross_entropy"), optax.losses.sigmoid_binary_cross_entropy),
        (dict(name="sigmoid_focal_loss"), optax.losses.sigmoid_focal_loss),
        (
            dict(name="sigmoid_focal_loss", alpha=0.25, gamma=1.5),
            lambda x, y: optax.losses.sigmoid_focal_loss(x, y, alpha=0.25, gamma=1.5),
        ),
        (dict(name="l2"), optax.losses.l2_loss),
        (dict(name="mse"), optax.losses.squared_error),
        (dict(name="huber"), optax.losses.huber_loss),
        (dict(name="huber", delta=0.3), lambda x, y: optax.losses.huber_loss(x, y, delta=0.3)),
    ],
    ids=lambda v: v["name"] + str(len(v)) if isinstance(v, dict) else "",
)
def test_elementwise_losses(rng, config, ref):
    preds = rng.normal(size=(B, 4)).astype(np.float32)
    targets = rng.integers(0, 2, size=(B, 4)).astype(np.float32)
    fn = losses.create(config)
    per_example = np.asarray(ref(preds, targets)).mean(axis=1)
    np.testing.assert_allclose(fn(preds, targets), per_example.mean(), rtol=1e-6)
    np.testing.assert_allclose(
        fn(preds, targets, weights=MASK), _weighted(per_example, MASK), rtol=1e-6
    )
    np.testing.assert_allclose(
        fn(preds, targets, weights=WEIGHTS), _weighted(per_example, WEIGHTS), rtol=1e-6
    )
    np.testing.assert_allclose(fn.per_example(preds, targets), per_example, rtol=1e-6)


def test_l2_is_half_mse(rng):
    preds = rng.normal(size=(B, 3)).astype(np.float32)
    targets = rng.normal(size=(B, 3)).astype(np.float32)
    l2 = losses.create(dict(name="l2"))(preds, targets)
    mse = losses.create(dict(name="mse"))(preds, targets)
    np.testing.assert_allclose(mse, np.mean((preds - targets) ** 2), rtol=1e-6)
    np.testing.assert_allclose(l2, 0.5 * mse, rtol=1e-6)


def test_cosine_distance(rng):
    preds = rng.normal(size=(B, 4)).astype(np.float32)
    targets = rng.normal(size=(B, 4)).astype(np.float32)
    fn = losses.create(dict(name="cosine_distance", epsilon=1e-6))
    ref = optax.losses.cosine_distance(preds, targets, epsilon=1e-6)
    np.testing.assert_allclose(fn(preds, targets), ref.mean(), rtol=1e-6)
    np.testing.assert_allclose(fn(preds, targets, weights=MASK), _weighted(ref, MASK), rtol=1e-6)


def test_mask_ignores_nan_padding_and_all_zero_mask(rng):
    preds = rng.normal(size=(B, 3)).astype(np.float32)
    targets = rng.normal(size=(B, 3)).astype(np.float32)
    preds[~MASK] = np.nan
    fn = losses.create(dict(name="mse"))
    expected = np.mean(((preds - targets) ** 2)[MASK])
    np.testing.assert_allclose(fn(preds, targets, weights=MASK), expected, rtol=1e-6)
    assert float(fn(preds, targets, weights=np.zeros(B))) == 0.0


def test_a_column_mask_counts_as_a_batch_mask(rng):
    # mask[:, None] is a common habit; it weights examples as the (B,) mask does.
    preds = rng.normal(size=(B, 3)).astype(np.float32)
    targets = rng.normal(size=(B, 3)).astype(np.float32)
    fn = losses.create(dict(name="huber"))
    np.testing.assert_allclose(
        fn(preds, targets, weights=MASK[:, None]), fn(preds, targets, weights=MASK), rtol=1e-6
    )
    with pytest.raises(ValueError, match=r"weights of shape \(4, 2\) fit neither the batch"):
        fn(preds[:4], targets[:4], weights=np.ones((4, 2)))


def test_numpy_numbers_are_numbers(rng):
    fn = losses.create(dict(name="softmax_cross_entropy", label_smoothing=np.float32(0.1)))
    logits, labels = rng.normal(size=(B, C)), rng.integers(0, C, size=B)
    assert np.isfinite(fn(logits, labels))
    assert 0 <= float(losses.top_k_accuracy(logits, labels, np.int64(2))) <= 1
    losses.create(dict(name="sigmoid_focal_loss", alpha=1.0))  # alpha's bound is closed
    with pytest.raises(config_errors.ConfigError, match=r"alpha .* in \[0.0, 1.0\], got 1.5"):
        losses.create(dict(name="sigmoid_focal_loss", alpha=1.5))


def test_losses_jit_and_grad(rng):
    logits = jnp.asarray(rng.normal(size=(B, C)), jnp.bfloat16)
    labels = jnp.asarray(rng.integers(0, C, size=B))
    fn = losses.create(dict(name="softmax_cross_entropy", label_smoothing=0.1))
    value, grad = jax.jit(jax.value_and_grad(lambda x: fn(x, labels, weights=MASK)))(logits)
    assert value.dtype == jnp.float32 and np.isfinite(value)
    assert grad.shape == logits.shape and np.all(np.asarray(grad, np.float32)[~MASK] == 0)


def test_accuracy_and_top_k(rng):
    logits = rng.normal(size=(8, C)).astype(np.float32)
    labels = rng.integers(0, C, size=8)
    order = np.argsort(-logits, axis=-1)
    rank = np.argmax(order == labels[:, None], axis=-1)
    mask = np.array([1, 0, 1, 1, 1, 0, 1, 1], bool)
    np.testing.assert_allclose(losses.accuracy(logits, labels), np.mean(rank == 0))
    np.testing.assert_allclose(
        losses.accuracy(logits, jax.nn.one_hot(labels, C), weights=mask), np.mean(rank[mask] == 0)
    )
    for k in (1, 2, 3, C):
        np.testing.assert_allclose(losses.top_k_accuracy(logits, labels, k), np.mean(rank < k))
        np.testing.assert_allclose(
            losses.top_k_accuracy(logits, jax.nn.one_hot(labels, C), k, weights=mask),
            np.mean(rank[mask] < k),
        )
    np.testing.assert_allclose(losses.top_k_accuracy(logits, labels, C), 1.0)
    with pytest.raises(ValueError, match="k must be"):
        losses.top_k_accuracy(logits, labels, C + 1)


def test_unknown_name_did_you_mean():
    with pytest.raises(config_errors.ConfigError, match=r"softmax_cros_entropy.*did you mean"):
        losses.create(dict(name="softmax_cros_entropy"))
    with pytest.raises(ValueError, match="loss.name is required"):
        losses.create(dict(label_smoothing=0.1))
    # optax.losses' function names point to the names here.
    for optax_name, ours in [("squared_error", "mse"), ("huber_loss", "huber"), ("l2_loss", "l2")]:
        with pytest.raises(config_errors.ConfigError, match=rf"did you mean '{ours}'"):
            losses.create(dict(name=optax_name))


def test_unknown_option_did_you_mean():
    with pytest.raises(ValueError, match=r"loss\.label_smothing.*did you mean 'label_smoothing'"):
        losses.create(dict(name="softmax_cross_entropy", label_smothing=0.1))
    with pytest.raises(ValueError, match=r"loss\.delta"):
        losses.create(dict(name="mse", delta=1.0))


@pytest.mark.parametrize(
    "config",
    [
        dict(name="softmax_cross_entropy", label_smoothing=1.0),
        dict(name="huber", delta=0.0),
        dict(name="sigmoid_focal_loss", gamma=-1.0),
        dict(name="cosine_distance", epsilon="x"),
    ],
)
def test_bad_option_values(config):
    with pytest.raises(config_errors.ConfigError, match="must be a number"):
        losses.create(config)


def test_shape_errors(rng):
    fn = losses.create(dict(name="softmax_cross_entropy"))
    with pytest.raises(ValueError, match="do not fit logits"):
        fn(np.zeros((B, C)), np.zeros((B, C + 1)))
    with pytest.raises(ValueError, match="same shape"):
        losses.create(dict(name="mse"))(np.zeros((B, 3)), np.zeros((B, 4)))
    with pytest.raises(ValueError, match="do not match the batch"):
        fn(np.zeros((B, C)), np.zeros(B, int), weights=np.ones(B + 1))

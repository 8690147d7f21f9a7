"""Tests of plugins.augment and its use by plugins.data's iterators."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from plugins import augment, config_errors, data, loop, losses

CIFAR = [
    dict(name="crop", padding=4),
    dict(name="flip"),
    dict(name="normalize", mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26)),
]
EVERY_OP = [
    dict(name="crop", padding=4),
    dict(name="flip"),
    dict(name="normalize", mean=0.5, std=0.25),
    dict(name="random_resized_crop", size=24),
    dict(name="resize", size=(20, 16)),
    dict(name="mixup", alpha=0.4),
    dict(name="cutmix"),
]


def images(n: int = 16, shape=(32, 32, 3), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, *shape), dtype=np.float32)


def batch_of(n: int = 16, shape=(32, 32, 3), seed: int = 0) -> dict:
    return {"image": images(n, shape, seed), "label": np.arange(n, dtype=np.int32) % 10}


def one(name: str, **options) -> list[dict]:
    return [dict(name=name, **options)]


# ----------------------------------------------------------------------------- each op


@pytest.mark.parametrize(
    "ops, shape",
    [
        (one("crop", padding=4), (32, 32, 3)),
        (one("crop", padding=2, size=28, pad_mode="reflect"), (28, 28, 3)),
        (one("flip"), (32, 32, 3)),
        (one("random_resized_crop", size=24), (24, 24, 3)),
        (one("random_resized_crop", size=(40, 48)), (40, 48, 3)),
        (one("resize", size=8), (8, 8, 3)),
        (one("mixup"), (32, 32, 3)),
        (one("cutmix"), (32, 32, 3)),
    ],
)
def test_ops_keep_dtype_and_range_and_give_their_shape(ops, shape):
    pipeline = augment.create(ops, (32, 32, 3), num_classes=10)
    assert pipeline.output_shape == shape
    batch = batch_of()
    before = batch["image"].copy()
    out = pipeline.train(batch, seed=1, step=5)
    np.testing.assert_array_equal(batch["image"], before)  # the input is left as it was
    assert out["image"].shape == (16, *shape) and out["image"].dtype == np.float32
    assert out["image"].min() >= 0 and out["image"].max() <= 1
    assert out["label"].shape == (16,) and out["label"].dtype == np.int32
    evaluated = pipeline.eval(batch_of())
    assert evaluated["image"].shape == (16, *shape) and evaluated["image"].dtype == np.float32


def test_normalize_uses_mean_and_std_per_channel_in_training_and_evaluation():
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 2.0)
    pipeline = augment.create(one("normalize", mean=mean, std=std), (4, 4, 3))
    batch = batch_of(2, (4, 4, 3))
    expected = (batch["image"] - np.array(mean)) / np.array(std)
    for out in (pipeline.train(batch, seed=0, step=0), pipeline.eval(batch)):
        np.testing.assert_allclose(out["image"], expected, rtol=1e-5, atol=1e-6)
        assert out["image"].dtype == np.float32


def test_flip_mirrors_the_chosen_images_and_no_others():
    batch = batch_of(64, (3, 5, 2))
    out = augment.create(one("flip"), (3, 5, 2)).train(batch, seed=0, step=0)
    flipped = [
        np.array_equal(o, x[:, ::-1]) for o, x in zip(out["image"], batch["image"], strict=True)
    ]
    same = [np.array_equal(o, x) for o, x in zip(out["image"], batch["image"], strict=True)]
    assert all(
        f != s for f, s in zip(flipped, same, strict=True)
    )  # each image exactly one of the two
    assert 10 < sum(flipped) < 54
    always = augment.create(one("flip", prob=1.0), (3, 5, 2)).train(batch, seed=0, step=0)
    np.testing.assert_array_equal(always["image"], batch["image"][:, :, ::-1])
    never = augment.create(one("flip", prob=0.0), (3, 5, 2)).train(batch, seed=0, step=0)
    np.testing.assert_array_equal(never["image"], batch["image"])
    evaluated = augment.create(one("flip", prob=1.0), (3, 5, 2)).eval(batch)
    np.testing.assert_array_equal(evaluated["image"], batch["image"])


def test_crop_is_a_window_of_the_zero_padded_image():
    batch = batch_of(32, (6, 6, 1))
    pipeline = augment.create(one("crop", padding=2), (6, 6, 1))
    out = pipeline.train(batch, seed=3, step=7)
    offsets = set()
    for o, x in zip(out["image"], batch["image"], strict=True):
        padded = np.pad(x, ((2, 2), (2, 2), (0, 0)))
        found = [
            (i, j)
            for i in range(5)
            for j in range(5)
            if np.array_equal(padded[i : i + 6, j : j + 6], o)
        ]
        assert found, "the crop is not a 6x6 window of the padded image"
        offsets.add(found[0])
    assert len(offsets) > 5  # the offsets vary
    np.testing.assert_array_equal(pipeline.eval(batch)["image"], batch["image"])
    # A smaller crop is a center crop in evaluation.
    center = augment.create(one("crop", padding=0, size=4), (6, 6, 1)).eval(batch)
    np.testing.assert_array_equal(center["image"], batch["image"][:, 1:5, 1:5])


def test_resize_to_the_same_size_and_a_full_box_keep_the_image():
    batch = batch_of(4, (8, 8, 3))
    out = augment.create(one("resize", size=8), (8, 8, 3)).eval(batch)
    np.testing.assert_allclose(out["image"], batch["image"], atol=1e-6)
    # A constant image stays constant under any crop and resize.
    flat = {"image": np.full((4, 8, 8, 3), 0.3, np.float32), "label": batch["label"]}
    rrc = augment.create(one("random_resized_crop", size=5), (8, 8, 3))
    np.testing.assert_allclose(rrc.train(flat, seed=0, step=0)["image"], 0.3, atol=1e-6)
    np.testing.assert_allclose(rrc.eval(flat)["image"], 0.3, atol=1e-6)


@pytest.mark.parametrize("name", ["mixup", "cutmix"])
def test_mixing_gives_soft_targets_of_mass_one_and_hard_labels_for_accuracy(name):
    pipeline = augment.create(one(name, alpha=1.0), (8, 8, 3), num_classes=10)
    assert pipeline.mixes and augment.mixes(one(name))
    batch = batch_of(16, (8, 8, 3))
    for step in range(5):
        out = pipeline.train(batch, seed=0, step=step)
        target = out["target"]
        assert target.shape == (16, 10) and target.dtype == np.float32
        np.testing.assert_allclose(target.sum(axis=1), 1.0, rtol=1e-6)
        assert (target >= 0).all()
        own = target[np.arange(16), batch["label"]]
        partner = target[np.arange(16), batch["label"][::-1]]
        np.testing.assert_allclose(own + partner, 1.0, rtol=1e-6)  # two classes only
        np.testing.assert_array_equal(out["label"], target.argmax(axis=1))
    # The loss takes the soft targets, accuracy the hard labels.
    logits = jnp.asarray(np.eye(10, dtype=np.float32)[out["label"]] * 5)
    loss = losses.create(dict(name="softmax_cross_entropy"))(logits, out["target"])
    assert np.isfinite(float(loss))
    assert float(losses.accuracy(logits, out["label"])) == 1.0
    # Evaluation never mixes.
    assert "target" not in pipeline.eval(batch)
    np.testing.assert_array_equal(pipeline.eval(batch)["image"], batch["image"])


def test_cutmix_pastes_a_box_from_the_partner_of_the_area_it_says():
    batch = batch_of(6, (10, 10, 1))
    out = augment.create(one("cutmix"), (10, 10, 1), num_classes=10).train(batch, seed=2, step=1)
    changed = out["image"] != batch["image"]
    from_partner = out["image"] == batch["image"][::-1]
    assert (out["image"] == np.where(changed, batch["image"][::-1], batch["image"])).all()
    assert from_partner.all(axis=0).any() or not changed.any()
    lam = out["target"][0, batch["label"][0]]
    pasted = changed.any(axis=0).sum()  # pixels of the box (random images differ everywhere)
    np.testing.assert_allclose(lam, 1 - pasted / 100, rtol=1e-6)


# ----------------------------------------------------------------------------- determinism


def test_same_seed_and_step_give_the_same_batch_and_another_step_another():
    pipeline = augment.create(EVERY_OP, (32, 32, 3), num_classes=10)
    a = pipeline.train(batch_of(), seed=4, step=9)
    b = pipeline.train(batch_of(), seed=4, step=9)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["image"], pipeline.train(batch_of(), seed=4, step=10)["image"])
    assert not np.array_equal(a["image"], pipeline.train(batch_of(), seed=5, step=9)["image"])


def test_crop_and_flip_draws_do_not_depend_on_the_process_count():
    pipeline = augment.create(CIFAR + one("random_resized_crop", size=20), (32, 32, 3))
    whole = batch_of(8)
    one_process = pipeline.train(whole, seed=0, step=3)["image"]
    halves = [
        pipeline.train(
            {k: v[4 * p : 4 * p + 4] for k, v in whole.items()},
            seed=0,
            step=3,
            process_index=p,
            process_count=2,
        )["image"]
        for p in range(2)
    ]
    np.testing.assert_array_equal(np.concatenate(halves), one_process)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("tfds"))
    tfds.builder("digits", data_dir=path).download_and_prepare()
    return path


DIGITS_OPS = [
    dict(name="crop", padding=2),
    dict(name="flip"),
    dict(name="normalize", mean=0.3, std=0.4),
    dict(name="mixup"),
]


@pytest.mark.parametrize("prefetch", [0, 2])
def test_resumed_train_iterator_gives_the_tail_of_an_uninterrupted_one(data_dir, prefetch):
    def batches(start_step: int, count: int) -> list[dict]:
        iterator = data.train_iterator(
            "digits", batch_size=100, seed=3, data_dir=data_dir, start_step=start_step,
            prefetch=prefetch, augment=DIGITS_OPS, num_classes=10,
        )  # fmt: skip
        out = list(itertools.islice(iterator, count))
        if hasattr(iterator, "close"):
            iterator.close()
        return out

    steps = data.steps_per_epoch("digits", batch_size=100, data_dir=data_dir)
    whole = batches(0, steps + 4)  # into the second epoch
    for start in (1, steps - 1, steps + 2):
        for x, y in zip(batches(start, 2), whole[start : start + 2], strict=True):
            assert x.keys() == y.keys() == {"image", "label", "target"}
            for key in x:
                np.testing.assert_array_equal(x[key], y[key])
    raw = next(data.train_iterator("digits", batch_size=100, seed=3, data_dir=data_dir, prefetch=0))
    np.testing.assert_array_equal(raw["label"][:4], raw["label"][:4])
    assert not np.array_equal(raw["image"], whole[0]["image"])  # augmented


def test_eval_iterator_applies_only_the_deterministic_ops(data_dir):
    ops = [dict(name="crop", padding=2), dict(name="flip"), dict(name="normalize", mean=0.5, std=2)]
    raw = list(data.eval_iterator("digits", batch_size=128, data_dir=data_dir))
    out = list(data.eval_iterator("digits", batch_size=128, data_dir=data_dir, augment=ops))
    for x, y in zip(raw, out, strict=True):
        np.testing.assert_allclose(y["image"], (x["image"] - 0.5) / 2, rtol=1e-6)
        np.testing.assert_array_equal(y["mask"], x["mask"])
        np.testing.assert_array_equal(y["label"], x["label"])


def test_example_batch_with_targets_is_typed_like_mixed_batches(data_dir):
    iterator = data.train_iterator(
        "digits", batch_size=16, seed=0, data_dir=data_dir, prefetch=0,
        augment=[dict(name="cutmix")], num_classes=10,
    )  # fmt: skip
    real = next(iterator)
    zeros = data.example_batch((8, 8, 1), 16, target_classes=10)
    assert {k: (v.shape, v.dtype) for k, v in real.items()} == {
        k: (v.shape, v.dtype) for k, v in zeros.items()
    }


# ----------------------------------------------------------------------------- config errors


@pytest.mark.parametrize(
    "ops, message",
    [
        (one("flp"), "unknown augmentation 'flp' at augment[0].name (did you mean 'flip'?)"),
        (one("crop", pading=4), "unknown key 'pading' at augment[0].pading"),
        (one("crop", padding=-1), "augment[0].padding must be a number in [0"),
        (one("crop", padding=1.5), "augment[0].padding must be an int >= 0"),
        (one("flip", prob=2), "augment[0].prob must be a number in [0, 1]"),
        (one("normalize", mean=0.5), "augment[0] (normalize) needs std"),
        (one("normalize", mean=0.5, std=0), "augment[0].std must be a number > 0"),
        (one("random_resized_crop"), "augment[0] (random_resized_crop) needs size"),
        (one("random_resized_crop", size=8, scale=(0.5, 0.1)), "low <= high"),
        (one("mixup", alpha=0), "augment[0].alpha must be a number in (0"),
        (dict(name="flip"), "augment must be a list of ops"),
        ("flip", "augment must be a list of op dicts"),
        (["flip"], "augment[0] must be a dict(name=..., ...)"),
        (CIFAR + one("crop", size=64), "augment[3] (crop): a 64x64 crop does not fit images"),
        (one("normalize", mean=(0.5, 0.5), std=1), "augment[0] (normalize): mean has 2 values"),
        (one("crop", padding=40, pad_mode="reflect"), "pad_mode='reflect' needs padding <"),
    ],
)
def test_bad_configs_are_one_config_error_line(ops, message):
    with pytest.raises(config_errors.ConfigError) as error:
        augment.create(ops, (32, 32, 3), num_classes=10)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_shapes_an_op_cannot_take_and_mixing_without_classes():
    with pytest.raises(config_errors.ConfigError, match="shape \\(H, W, C\\)"):
        augment.create(one("flip"), (32, 32))
    with pytest.raises(config_errors.ConfigError, match="number of classes"):
        augment.create(one("mixup"), (32, 32, 3))


def loop_config(**changes) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict(
        dict(
            seed=0, dataset="digits", data_dir=None, model=dict(name="cnn"), batch_size=8,
            eval_batch_size=8, num_train_steps=10, log_every_steps=5, eval_every_steps=5,
            checkpoint_every_steps=5, half_precision=False,
            optimizer=dict(name="adamw", learning_rate=1e-3),
            loss=dict(name="softmax_cross_entropy"),
        )
    )  # fmt: skip
    for key, value in changes.items():
        config[key] = value
    return config


def test_check_config_takes_augment_as_an_optional_key():
    loop.check_config(loop_config(), model_check=lambda model: None)  # no augment key: fine
    loop.check_config(loop_config(augment=CIFAR), model_check=lambda model: None)
    loop.check_config(loop_config(augment=()), model_check=lambda model: None)
    with pytest.raises(config_errors.ConfigError, match=r"augment\[1\]\.name"):
        loop.check_config(
            loop_config(augment=[dict(name="flip"), dict(name="cutmixx")]),
            model_check=lambda model: None,
        )
    assert loop.OPTIONAL_KEYS["augment"] == ()


@pytest.mark.parametrize(
    "ops",
    [
        [dict(name="normalize", mean=(0.5, 0.4, 0.3), std=0.25)],
        [dict(name="crop", size=(6, 6)), dict(name="normalize", mean=0.5, std=0.2)],
        [dict(name="resize", size=12)],
        [dict(name="random_resized_crop", size=(7, 9)), dict(name="flip")],
    ],
)
def test_evaluation_ops_trace_for_any_batch_size_and_match_numpy(ops):
    pipeline = augment.create(ops, (10, 8, 3))
    images = np.random.default_rng(0).random((5, 10, 8, 3), dtype=np.float32)
    expected = pipeline.eval({"image": images})["image"]
    (b,) = jax.export.symbolic_shape("b")
    spec = jax.ShapeDtypeStruct((b, 10, 8, 3), np.float32)
    exported = jax.export.export(jax.jit(lambda x: pipeline.eval({"image": x})["image"]))(spec)
    np.testing.assert_allclose(exported.call(images), expected, rtol=1e-6, atol=1e-6)
    assert exported.call(images[:2]).shape == (2, *pipeline.output_shape)

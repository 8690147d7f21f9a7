"""plugins.export: a forward pass saved for any batch size, read back with jax alone; images
read from numpy files and folders; top-k classes."""

from __future__ import annotations

import json
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from plugins import export

W = np.arange(8 * 8 * 1 * 3, dtype=np.float32).reshape(64, 3) / 100.0


def forward(images):
    return images.reshape(images.shape[0], -1) @ jnp.asarray(W)


def test_saved_forward_runs_for_any_batch_size_with_jax_alone(tmp_path):
    path = export.save(
        forward, tmp_path / "out", input_shape=(8, 8, 1), class_names=["a", "b", "c"],
        info={"step": 7},
    )  # fmt: skip
    images = np.random.default_rng(0).random((5, 8, 8, 1), np.float32)
    call, meta = export.load(path)
    np.testing.assert_allclose(call(images), forward(images), rtol=1e-6)
    np.testing.assert_allclose(call(images[:2]), forward(images[:2]), rtol=1e-6)
    assert meta == {"input_shape": [8, 8, 1], "class_names": ["a", "b", "c"], "step": 7}
    # Another process, importing nothing of this repository: jax.export alone.
    np.save(tmp_path / "x.npy", images)
    script = (
        "import sys, numpy as np, jax\n"
        "sys.modules['plugins'] = None\n"
        "exp = jax.export.deserialize(bytearray(open(sys.argv[1], 'rb').read()))\n"
        "print(np.asarray(exp.call(np.load(sys.argv[2]))).round(4).tolist())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(path / "model.jax"), str(tmp_path / "x.npy")],
        capture_output=True, text=True, check=True, cwd=tmp_path,
    ).stdout  # fmt: skip
    np.testing.assert_allclose(json.loads(out), forward(images), atol=1e-3)


def test_numpy_images_as_the_model_takes_them(tmp_path):
    uint8 = np.random.default_rng(0).integers(0, 256, (3, 8, 8), np.uint8)  # (N, H, W) gray
    np.save(tmp_path / "u.npy", uint8)
    batch, names = export.read_images(tmp_path / "u.npy", (8, 8, 1))
    assert batch.shape == (3, 8, 8, 1) and batch.dtype == np.float32
    np.testing.assert_allclose(batch[..., 0], uint8 / 255.0)
    assert names == ["u.npy[0]", "u.npy[1]", "u.npy[2]"]
    floats = batch * 0.5
    np.savez(tmp_path / "f.npz", image=floats, label=np.zeros(3))
    np.testing.assert_array_equal(export.read_images(tmp_path / "f.npz", (8, 8, 1))[0], floats)
    big = np.full((2, 16, 16, 3), 255, np.uint8)  # another size, colour: resized, to gray
    np.save(tmp_path / "big.npy", big)
    np.testing.assert_allclose(export.read_images(tmp_path / "big.npy", (8, 8, 1))[0], 1.0)


def test_a_folder_of_images_is_read_in_name_order(tmp_path):
    for name, value in [("b.png", 255), ("a.jpg", 0)]:
        Image.fromarray(np.full((20, 30, 3), value, np.uint8)).save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image")
    batch, names = export.read_images(tmp_path, (8, 8, 1))
    assert names == ["a.jpg", "b.png"] and batch.shape == (2, 8, 8, 1)
    assert batch[0].max() < 0.05 and batch[1].min() > 0.95


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p / "missing.npy", "does not exist"),
        (lambda p: (p / "x.txt").write_text("1") and p / "x.txt", "give a .npy or .npz"),
        (lambda p: (p / "bad.npy").write_bytes(b"garbage") and p / "bad.npy", "cannot be read"),
        (lambda p: np.save(p / "v.npy", np.zeros(5)) or p / "v.npy", r"expected \(N, H, W"),
        (lambda p: (p / "d").mkdir() or p / "d", "holds no image files"),
        (lambda p: (p / "broken.png").write_bytes(b"no") and p, "cannot be read as an image"),
    ],
)
def test_images_that_cannot_be_read_are_one_clear_error(tmp_path, make, message):
    with pytest.raises(export.ImagesError, match=message):
        export.read_images(make(tmp_path), (8, 8, 1))


def test_top_k_ranks_classes_by_probability():
    ranked = export.top_k(np.log(np.array([[0.1, 0.7, 0.2], [0.5, 0.2, 0.3]])), 2)
    assert [[c for c, _ in row] for row in ranked] == [[1, 2], [0, 2]]
    np.testing.assert_allclose([p for p in (ranked[0][0][1], ranked[1][1][1])], [0.7, 0.3])
    assert len(export.top_k(np.zeros((1, 3)), 10)[0]) == 3

"""The offline ``digits`` tfds dataset: scikit-learn's bundled 8x8 handwritten digits.

Importing this module (``plugins.data`` does) registers the builder, so that
``tfds.builder('digits', data_dir=...)`` and ``tfds.load('digits', data_dir=...)`` work like any
tfds dataset. Preparation reads the copy of the data that ships inside scikit-learn: no network.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

#: Seed of the fixed stratified train/test permutation (changing it needs a new VERSION).
SPLIT_SEED = 0
#: Fraction of every class that goes to ``test``.
TEST_FRACTION = 0.2

_DESCRIPTION = """\
Optical recognition of handwritten digits (the copy bundled with scikit-learn,
`sklearn.datasets.load_digits`): 1797 grayscale 8x8 images of the digits 0-9, each pixel the number
of "on" pixels (0..16) in a 4x4 block of a 32x32 bitmap, rescaled here to uint8 0..255 as
round(v * 255 / 16).

Splits are fixed and deterministic: a stratified permutation seeded with 0 puts round(20%) of every
class in `test` (359 examples) and the rest in `train` (1438 examples). Example keys are the indices
into `load_digits()`.
"""

_CITATION = """\
@misc{alpaydin1998optical,
  author       = {Alpaydin, E. and Kaynak, C.},
  title        = {Optical Recognition of Handwritten Digits},
  year         = {1998},
  howpublished = {UCI Machine Learning Repository},
  doi          = {10.24432/C50P49},
}
"""


def split_indices(labels: np.ndarray) -> dict[str, np.ndarray]:
    """Returns sorted indices of the ``train`` and ``test`` examples for these ``labels``.

    Stratified and deterministic: for every class, a permutation seeded with ``SPLIT_SEED`` puts the
    first ``round(TEST_FRACTION * count)`` examples of that class in ``test``.
    """
    rng = np.random.default_rng(SPLIT_SEED)
    test = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        test.append(rng.permutation(members)[: int(round(TEST_FRACTION * len(members)))])
    is_test = np.zeros(len(labels), bool)
    is_test[np.concatenate(test)] = True
    return {"train": np.flatnonzero(~is_test), "test": np.flatnonzero(is_test)}


def _load() -> tuple[np.ndarray, np.ndarray]:
    """Returns (images uint8 (N, 8, 8, 1) scaled to 0..255, labels int64 (N,))."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return images, bunch.target.astype(np.int64)


class Digits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn's bundled handwritten digits as a tfds dataset (8x8x1 uint8, 10 classes)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release: stratified 80/20 split seeded with 0."}
    # tfds derives ``code_path`` (used only to look for a checksums.tsv) through
    # ``importlib_resources``, which tfds 4.9.10 imports but does not declare on Python >= 3.9.
    # This builder downloads nothing, so pin the path to this file and skip that import.
    code_path = epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=_DESCRIPTION,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(8, 8, 1)),
                    "label": tfds.features.ClassLabel(num_classes=10),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://archive.ics.uci.edu/dataset/80/optical+recognition+of+handwritten+digits",
            citation=_CITATION,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # The data ships with scikit-learn.
        images, labels = _load()
        return {
            name: self._generate_examples(images, labels, indices)
            for name, indices in split_indices(labels).items()
        }

    def _generate_examples(
        self, images: np.ndarray, labels: np.ndarray, indices: np.ndarray
    ) -> Iterator[tuple[int, dict]]:
        for i in indices:
            yield int(i), {"image": images[i], "label": int(labels[i])}

"""Patch sampling: shapes, padding, foreground share, determinism, aligned flips."""

import numpy as np
import pytest

from utils.sampling import PatchSampler, extract_patch, random_flips


def make_volumes():
    rng = np.random.default_rng(0)
    images, labels = {}, {}
    for i, shape in enumerate([(20, 30, 25), (6, 10, 9)]):
        label = np.zeros(shape, dtype=np.uint8)
        label[2:4, 3:5, 3:5] = 1  # a small object, so random patches rarely hit it
        label[4, 6, 6] = 2
        images[f"c{i}"] = rng.normal(size=(*shape, 1)).astype(np.float32)
        labels[f"c{i}"] = label
    return images, labels


def test_extract_patch_pads_outside_the_volume():
    array = np.arange(24).reshape(2, 3, 4)
    patch = extract_patch(array, (-1, 1, 2), (3, 3, 3))
    assert patch.shape == (3, 3, 3)
    np.testing.assert_array_equal(patch[0], 0)
    np.testing.assert_array_equal(patch[1:, :2, :2], array[:, 1:3, 2:4])
    np.testing.assert_array_equal(patch[:, 2], 0)


@pytest.mark.parametrize(("patch", "x_shape"), [((8, 12, 12), (4, 8, 12, 12, 1)), ((12, 12), (4, 12, 12, 1))])
def test_batches_have_patch_shape_and_one_hot_labels(patch, x_shape):
    images, labels = make_volumes()
    sampler = PatchSampler(images.get, labels.get, ["c0", "c1"], patch, 3, batch_size=4, steps_per_epoch=3)
    x, y = sampler[0]
    assert x.shape == x_shape and x.dtype == np.float32
    assert y.shape == (*x_shape[:-1], 3)
    np.testing.assert_array_equal(y.sum(-1), 1.0)


def test_foreground_share_matches_the_ratio():
    images, labels = make_volumes()
    sampler = PatchSampler(
        images.get, labels.get, ["c0"], (4, 4, 4), 3, batch_size=10, steps_per_epoch=40, foreground_ratio=0.5
    )
    with_foreground = np.mean([(y[..., 1:].sum(axis=(1, 2, 3, 4)) > 0) for _, y in (sampler[i] for i in range(40))])
    # forced patches always hold foreground; random 4^3 patches in 20x30x25 almost never do
    assert 0.4 < with_foreground < 0.62


def test_batches_are_deterministic_for_a_seed_and_epoch():
    images, labels = make_volumes()
    a = PatchSampler(images.get, labels.get, ["c0", "c1"], (8, 8, 8), 3, batch_size=2, seed=5)
    b = PatchSampler(images.get, labels.get, ["c0", "c1"], (8, 8, 8), 3, batch_size=2, seed=5)
    np.testing.assert_array_equal(a[3][0], b[3][0])
    b.set_epoch(1)
    assert not np.array_equal(a[3][0], b[3][0])
    a.on_epoch_end()
    np.testing.assert_array_equal(a[3][0], b[3][0])


def test_flips_keep_image_and_label_aligned():
    rng = np.random.default_rng(1)
    label = rng.integers(0, 3, size=(5, 6, 7))
    image = label[..., None].astype(np.float32) * 10
    flipped_image, flipped_label = random_flips(probability=1.0)(image, label, rng)
    np.testing.assert_array_equal(flipped_label, label[::-1, ::-1, ::-1])
    np.testing.assert_array_equal(flipped_image[..., 0], flipped_label * 10)


def test_empty_training_split_is_refused():
    with pytest.raises(ValueError, match="empty"):
        PatchSampler(dict().get, dict().get, [], (8, 8, 8), 2)

"""Patch sampling: shapes, padding, foreground share per class, determinism (also through Keras workers), stacks,
augmentation read through the volume, deep-supervision targets."""

import numpy as np
import pytest

from utils.train.augment import Augmenter, augmentation_settings, coordinates_of
from utils.train.sampling import (
    PatchSampler,
    StackSampler,
    extract_patch,
    foreground_flags,
    read_affine,
    read_transformed,
)


def make_volumes():
    rng = np.random.default_rng(0)
    images, labels = {}, {}
    for i, shape in enumerate([(20, 30, 25), (6, 10, 9)]):
        label = np.zeros(shape, dtype=np.uint8)
        label[2:4, 3:5, 3:5] = 1  # a small object, so random patches rarely hit it
        label[4, 6, 6] = 2  # a rare class: one voxel
        images[f"c{i}"] = rng.normal(size=(*shape, 1)).astype(np.float32)
        labels[f"c{i}"] = label
    return images, labels


def sampler_for(patch, **kwargs):
    images, labels = make_volumes()
    cases = kwargs.pop("cases", ["c0", "c1"])
    options = {"batch_size": 4, "steps_per_epoch": 3, **kwargs}
    return PatchSampler(images.get, labels.get, cases, patch, 3, **options)


def test_extract_patch_pads_outside_the_volume():
    array = np.arange(24).reshape(2, 3, 4)
    patch = extract_patch(array, (-1, 1, 2), (3, 3, 3))
    assert patch.shape == (3, 3, 3)
    np.testing.assert_array_equal(patch[0], 0)
    np.testing.assert_array_equal(patch[1:, :2, :2], array[:, 1:3, 2:4])
    np.testing.assert_array_equal(patch[:, 2], 0)


@pytest.mark.parametrize(("patch", "x_shape"), [((8, 12, 12), (4, 8, 12, 12, 1)), ((12, 12), (4, 12, 12, 1))])
def test_batches_have_patch_shape_and_label_map_targets(patch, x_shape):
    x, y = sampler_for(patch)[0]
    assert x.shape == x_shape and x.dtype == np.float32
    assert y.shape == x_shape[:-1] and y.dtype == np.uint8
    assert set(np.unique(y)) <= {0, 1, 2}


def test_one_hot_targets_are_the_one_hot_of_the_label_maps():
    _, labels = sampler_for((8, 12, 12), seed=3)[1]
    _, one_hot = sampler_for((8, 12, 12), seed=3, one_hot=True)[1]
    assert one_hot.shape == (*labels.shape, 3) and one_hot.dtype == np.float32
    np.testing.assert_array_equal(one_hot, np.eye(3, dtype=np.float32)[labels])


def test_volumes_smaller_than_the_patch_are_padded_with_zeros_and_background():
    images, labels = make_volumes()
    sampler = PatchSampler(images.get, labels.get, ["c1"], (8, 16, 16), 3, batch_size=2, foreground_ratio=1.0)
    x, y = sampler[0]
    # the 6 x 10 x 9 case sits in the middle: 1 slice of padding before it along axis 0, 3 along axis 1 ...
    np.testing.assert_array_equal(x[:, 0], 0)
    np.testing.assert_array_equal(x[:, 7], 0)
    np.testing.assert_array_equal(x[:, 1:7, 3:13, 3:12, 0], np.broadcast_to(images["c1"][..., 0], (2, 6, 10, 9)))
    assert (y[:, 0] == 0).all()


def test_random_padding_shifts_a_small_volume_inside_the_patch():
    images, labels = make_volumes()
    sampler = PatchSampler(images.get, labels.get, ["c1"], (8, 16, 16), 3, batch_size=16, random_padding=True)
    x, _ = sampler[0]
    inside = np.abs(x[..., 0]) > 0
    assert all(box.sum() == images["c1"].size for box in inside)  # the whole 6 x 10 x 9 case, never cut
    first_rows = {int(np.argwhere(box.any(axis=(1, 2)))[0, 0]) for box in inside}
    assert first_rows == {0, 1, 2}  # 8 - 6 + 1 offsets along axis 0


@pytest.mark.parametrize(("batch", "ratio"), [(2, 0.33), (4, 0.5), (5, 0.2), (3, 1.0), (3, 0.0)])
def test_foreground_flags_have_the_expected_count(batch, ratio):
    counts = [foreground_flags(batch, ratio, np.random.default_rng(i)).sum() for i in range(400)]
    assert set(counts) <= {int(batch * ratio), int(np.ceil(batch * ratio))}
    assert np.mean(counts) / batch == pytest.approx(ratio, abs=0.03)


def test_foreground_share_matches_the_ratio():
    sampler = sampler_for((4, 4, 4), cases=["c0"], batch_size=10, steps_per_epoch=40, foreground_ratio=0.5)
    with_foreground = np.mean([(y > 0).any(axis=(1, 2, 3)) for _, y in (sampler[i] for i in range(40))])
    # placed patches always hold foreground; random 4^3 patches in 20x30x25 almost never do
    assert 0.45 < with_foreground < 0.58


def test_a_rare_class_gets_half_of_the_foreground_patches():
    sampler = sampler_for((4, 4, 4), cases=["c0"], batch_size=10, steps_per_epoch=40, foreground_ratio=1.0)
    batches = [sampler[i][1] for i in range(40)]
    with_rare = np.mean([(y == 2).any(axis=(1, 2, 3)) for y in batches])
    assert 0.4 < with_rare < 0.6  # one voxel of class 2 against 8 of class 1, each class drawn half the time


def test_batches_are_a_function_of_seed_epoch_and_step():
    a = sampler_for((8, 8, 8), seed=5)
    b = sampler_for((8, 8, 8), seed=5)
    np.testing.assert_array_equal(a[4][0], b.batch(1, 1)[0])  # index 4 with 3 steps per epoch: epoch 1, step 1
    b.set_epoch(1)
    np.testing.assert_array_equal(a[4][0], b[1][0])
    assert not np.array_equal(a[1][0], b[1][0])
    assert not np.array_equal(a[0][0], sampler_for((8, 8, 8), seed=6)[0][0])
    assert not np.array_equal(a.batch(0, 0, shard=0)[0], a.batch(0, 0, shard=1)[0])


def test_spatial_augmentation_reads_around_the_patch():
    """A quarter turn read through the volume equals the rotated patch: the window came from the right place."""
    rng = np.random.default_rng(0)
    volume = rng.normal(size=(30, 30, 30, 1)).astype(np.float32)
    label = (volume[..., 0] > 1).astype(np.uint8)
    augmenter = Augmenter(augmentation_settings("none", 3, {"rotation": {"p": 1, "angle": [90, 90], "axes": [0]}}), 3)
    coordinates = augmenter.spatial_coordinates((8, 8, 8), np.random.default_rng(1))
    x, y = read_transformed(volume, label, (10, 5, 12), (8, 8, 8), coordinates, image_order=1)
    patch, patch_label = volume[10:18, 5:13, 12:20], label[10:18, 5:13, 12:20]
    match = [k for k in (1, -1) if np.allclose(x, np.rot90(patch, k, axes=(1, 2)), atol=1e-5)]
    assert match and np.array_equal(y, np.rot90(patch_label, match[0], axes=(1, 2)))


@pytest.mark.parametrize("start", [(11, 9, 10), (0, 0, 0), (22, 22, 20)])  # inside, and overhanging both corners
def test_rotation_and_scaling_read_without_a_grid_equal_the_grid_read(start):
    """The affine fast path (scipy's affine_transform on a window bounded by the patch's corners) gives the values of
    the coordinate-grid path (map_coordinates) for the same drawn transform, zero padding at the borders included."""
    rng = np.random.default_rng(3)
    volume = rng.normal(size=(32, 32, 30, 2)).astype(np.float32)
    label = rng.integers(0, 3, size=(32, 32, 30)).astype(np.uint8)
    settings = augmentation_settings("none", 3, {"rotation": {"p": 1, "angle": [-30, 30]}, "scale": {"p": 1}})
    for seed in range(4):
        transform = Augmenter(settings, 3).spatial_transform((10, 12, 10), np.random.default_rng(seed))
        assert transform[1] is None and not np.allclose(transform[0], np.eye(3))
        fast = read_affine(volume, label, start, (10, 12, 10), transform[0], image_order=1)
        grid = read_transformed(volume, label, start, (10, 12, 10), coordinates_of(transform, (10, 12, 10)), 1)
        np.testing.assert_allclose(fast[0], grid[0], atol=1e-5)
        assert fast[0].shape == (10, 12, 10, 2) and fast[1].dtype == np.uint8
        assert np.mean(fast[1] == grid[1]) > 0.999  # nearest: a coordinate exactly halfway may round either way


def test_augmented_batches_keep_image_and_label_together():
    images, labels = make_volumes()
    images = {k: (v[..., 0] * 0 + labels[k] * 10).astype(np.float32)[..., None] for k, v in images.items()}
    settings = augmentation_settings("none", 3, {"rotation": {"p": 1}, "scale": {"p": 1}, "flip": {"p": 0.5}})
    sampler = PatchSampler(
        images.get, labels.get, ["c0"], (8, 8, 8), 3, batch_size=6, foreground_ratio=1.0,
        augment=Augmenter(settings, 3, image_order=0),
    )  # fmt: skip
    x, y = sampler[0]
    np.testing.assert_array_equal(x[..., 0], y * 10.0)


def test_deep_supervision_targets_are_strided_truth():
    sampler = sampler_for((8, 8, 8), target_strides=[(1, 1, 1), (2, 2, 2), (4, 4, 4)])
    x, targets = sampler[0]
    assert [t.shape for t in targets] == [(4, 8, 8, 8), (4, 4, 4, 4), (4, 2, 2, 2)]
    np.testing.assert_array_equal(targets[1], targets[0][:, ::2, ::2, ::2])


def test_stack_sampler_reads_rows_pads_and_oversamples():
    rng = np.random.default_rng(0)
    labels = np.zeros((50, 12, 10), dtype=np.uint8)
    labels[3, 4:6, 4:6] = 1
    labels[40, 2, 2] = 2
    images = rng.normal(size=(50, 12, 10, 1)).astype(np.float32)
    sampler = StackSampler(images, labels, (16, 16), 3, batch_size=8, steps_per_epoch=20, foreground_ratio=0.5)
    batches = [sampler[i] for i in range(20)]
    x, y = batches[0]
    assert x.shape == (8, 16, 16, 1) and y.shape == (8, 16, 16)
    np.testing.assert_array_equal(x[:, :2], 0)  # 12 rows padded to 16: 2 above, 2 below
    present = np.concatenate([np.stack([(y == k).any(axis=(1, 2)) for k in (1, 2)], -1) for _, y in batches])
    assert 0.42 < present.any(axis=1).mean() < 0.58  # 2 of 50 rows hold foreground: nearly all from placement
    assert 0.15 < present[:, 1].mean() < 0.35  # class 2 (one voxel in one row) gets half of the placed samples


def test_targets_of_a_network_of_valid_convolutions_are_the_centre_of_the_patch():
    plain = sampler_for((12, 12), foreground_ratio=0.0, seed=5)
    trimmed = sampler_for((12, 12), foreground_ratio=0.0, seed=5, target_margin=3)
    (x, y), (x_trimmed, y_trimmed) = plain[2], trimmed[2]
    np.testing.assert_array_equal(x_trimmed, x)
    np.testing.assert_array_equal(y_trimmed, y[:, 3:-3, 3:-3])
    # a sample placed on foreground holds it in its targets, not only in the margin around them
    rng = np.random.default_rng(1)
    labels = np.zeros((30, 48, 40), dtype=np.uint8)
    labels[:, 20:23, 18:21] = 1
    images = rng.normal(size=(30, 48, 40, 1)).astype(np.float32)
    sampler = StackSampler(images, labels, (40, 40), 2, batch_size=6, foreground_ratio=1.0, target_margin=16)
    for index in range(5):
        x, y = sampler[index]
        assert x.shape == (6, 40, 40, 1) and y.shape == (6, 8, 8)
        assert (y == 1).any(axis=(1, 2)).all()
    with pytest.raises(ValueError, match="leaves no target"):
        sampler_for((12, 12), target_margin=6)


def test_stack_and_patch_size_must_agree():
    with pytest.raises(ValueError, match="do not fit a patch size"):
        StackSampler(np.zeros((2, 8, 8, 1)), np.zeros((2, 8, 8)), (8, 8, 8), 2)
    with pytest.raises(ValueError, match="do not match"):
        StackSampler(np.zeros((2, 8, 8, 1)), np.zeros((3, 8, 8)), (8, 8), 2)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="empty"):
        PatchSampler(dict().get, dict().get, [], (8, 8, 8), 2)
    with pytest.raises(ValueError, match="foreground ratio"):
        sampler_for((8, 8, 8), foreground_ratio=1.5)


def test_prepared_dataset_keeps_maps_open_and_pickles_without_them(prepared_sample):
    import pickle

    from utils.prepared import PreparedDataset

    data = PreparedDataset(prepared_sample)
    first, second, third = data.split("train")[:3]
    image = data.image(first)
    assert isinstance(image, np.memmap) and data.image(first) is image  # the open map is reused
    data._max_maps = 2
    data.label(first)  # most recent: image(first) is now the oldest of three, and is closed
    data.image(second)
    assert list(data._maps) == [data.cases[first]["label"], data.cases[second]["image"]]
    clone = pickle.loads(pickle.dumps(data))
    assert clone._maps == {} and len(pickle.dumps(data)) < 50_000  # no volume travels to worker processes
    np.testing.assert_array_equal(clone.image(third), data.image(third))

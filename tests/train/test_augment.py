"""Augmentation: identity at zero strength, image and label kept aligned, references, presets, settings checks."""

import numpy as np
import pytest

from utils.settings import AUGMENT_PRESETS
from utils.train.augment import TRANSFORMS, Augmenter, augmentation_settings

ZERO_STRENGTH = {
    "rotation": {"angle": [0.0, 0.0]},
    "scale": {"range": [1.0, 1.0]},
    "elastic": {"magnitude": [0.0, 0.0]},
    "noise": {"std": [0.0, 0.0]},
    "blur": {"sigma": [0.0, 0.0]},
    "brightness": {"range": [1.0, 1.0]},
    "contrast": {"range": [1.0, 1.0]},
    "lowres": {"zoom": [1.0, 1.0]},
    "gamma": {"range": [1.0, 1.0]},
    "rot90": {"p": 0.0},
    "flip": {"p": 0.0},
}
SPATIAL = ("rotation", "scale", "elastic", "rot90", "flip")
INTENSITY = ("noise", "blur", "brightness", "contrast", "lowres", "gamma")


def only(transform: str, ndim: int, **options) -> Augmenter:
    """An augmenter running one transform every time (p = 1 unless set)."""
    settings = augmentation_settings("none", ndim, {transform: {"p": 1.0, **options}})
    return Augmenter(settings, ndim, image_order=0)


def blobs(ndim: int, seed: int = 0):
    """A label of boxes of classes 1 and 2 and an image that encodes it (10 per class) plus a gradient."""
    rng = np.random.default_rng(seed)
    shape = (20, 24, 22)[-ndim:] if ndim == 3 else (24, 24)
    label = np.zeros(shape, dtype=np.uint8)
    for k in (1, 2):
        lo = [int(rng.integers(2, s // 2)) for s in shape]
        label[tuple(slice(a, a + s // 3) for a, s in zip(lo, shape, strict=True))] = k
    image = (label.astype(np.float32) * 10)[..., None]
    return image, label


def test_every_transform_has_a_zero_strength_setting():
    assert set(ZERO_STRENGTH) == set(TRANSFORMS)


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("transform", sorted(TRANSFORMS))
def test_zero_strength_is_the_identity(transform, ndim):
    image, label = blobs(ndim)
    image = image + np.linspace(0, 1, image.size, dtype=np.float32).reshape(image.shape)
    options = {"p": 1.0, **ZERO_STRENGTH[transform]}
    augmenter = Augmenter(augmentation_settings("none", ndim, {transform: options}), ndim)
    out_image, out_label = augmenter(image, label, np.random.default_rng(3))
    np.testing.assert_allclose(out_image, image, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out_label, label)


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("transform", SPATIAL)
def test_spatial_transforms_keep_image_and_label_aligned(transform, ndim):
    """With nearest interpolation for the image too, the image still encodes the transformed label exactly."""
    image, label = blobs(ndim, seed=1)
    options = {"elastic": {"magnitude": [3.0, 3.0], "sigma": [4.0, 4.0]}, "scale": {"range": [0.8, 0.8]}}
    augmenter = only(transform, ndim, **options.get(transform, {}))
    for seed in range(3):
        out_image, out_label = augmenter(image, label, np.random.default_rng(seed))
        assert out_image.shape == image.shape and out_label.shape == label.shape
        np.testing.assert_array_equal(out_image[..., 0], out_label.astype(np.float32) * 10)
        assert set(np.unique(out_label)) <= {0, 1, 2}
    if transform in ("rotation", "elastic"):
        assert not np.array_equal(out_label, label)


def test_rotation_by_a_quarter_turn_matches_numpy():
    image, label = blobs(2)
    out_image, out_label = only("rotation", 2, angle=[90.0, 90.0])(image, label, np.random.default_rng(0))
    reference = [np.rot90(label, k) for k in (1, -1)]
    assert any(np.array_equal(out_label, r) for r in reference)
    np.testing.assert_array_equal(out_image[..., 0], out_label * 10.0)


def test_rotation_about_one_axis_in_3d_leaves_that_axis_alone():
    image, label = blobs(3)
    label = label[:, :22, :22]
    image = image[:, :22, :22]
    out_image, out_label = only("rotation", 3, angle=[90.0, 90.0], axes=[0])(image, label, np.random.default_rng(0))
    assert any(np.array_equal(out_label, np.rot90(label, k, axes=(1, 2))) for k in (1, -1))


def test_scaling_zooms_about_the_centre():
    image, label = blobs(2)
    label = np.zeros((24, 24), dtype=np.uint8)
    label[8:16, 8:16] = 1
    image = label[..., None].astype(np.float32)
    _, zoomed_out = only("scale", 2, range=[2.0, 2.0])(image, label, np.random.default_rng(0))
    _, zoomed_in = only("scale", 2, range=[0.5, 0.5])(image, label, np.random.default_rng(0))
    assert zoomed_out.sum() == pytest.approx(label.sum() / 4, rel=0.3)
    assert zoomed_in.sum() == pytest.approx(label.sum() * 4, rel=0.3)


def test_flip_matches_numpy():
    image, label = blobs(3)
    out_image, out_label = only("flip", 3)(image, label, np.random.default_rng(0))
    np.testing.assert_array_equal(out_label, label[::-1, ::-1, ::-1])
    np.testing.assert_array_equal(out_image, image[::-1, ::-1, ::-1])


def test_rot90_only_in_planes_of_equal_size():
    image, label = blobs(3)  # 20 x 24 x 22: no two axes are equal
    out_image, out_label = only("rot90", 3)(image, label, np.random.default_rng(0))
    np.testing.assert_array_equal(out_label, label)
    cube_label = label[:20, :20, :20]
    _, rotated = only("rot90", 3)(image[:20, :20, :20], cube_label, np.random.default_rng(0))
    assert rotated.shape == cube_label.shape and not np.array_equal(rotated, cube_label)


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("transform", INTENSITY)
def test_intensity_transforms_change_the_image_only(transform, ndim):
    image, label = blobs(ndim)
    image = image + np.random.default_rng(0).normal(size=image.shape).astype(np.float32)
    options = {
        "noise": {"std": [0.5, 0.5]},
        "blur": {"sigma": [1.0, 1.0]},
        "brightness": {"range": [1.5, 1.5]},
        "contrast": {"range": [1.5, 1.5]},
        "lowres": {"zoom": [0.5, 0.5]},
        "gamma": {"range": [2.0, 2.0]},
    }[transform]
    out_image, out_label = only(transform, ndim, **options)(image, label, np.random.default_rng(0))
    assert out_image.shape == image.shape and out_image.dtype == np.float32
    assert not np.allclose(out_image, image)
    np.testing.assert_array_equal(out_label, label)


def test_brightness_is_multiplicative_and_gamma_keeps_the_statistics():
    image, label = blobs(2)
    image = image + 1.0
    out, _ = only("brightness", 2, range=[2.0, 2.0])(image, label, np.random.default_rng(0))
    np.testing.assert_allclose(out, image * 2)
    out, _ = only("gamma", 2, range=[2.0, 2.0])(image, label, np.random.default_rng(0))
    assert out.mean() == pytest.approx(image.mean(), rel=1e-4) and out.std() == pytest.approx(image.std(), rel=1e-4)


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("name", AUGMENT_PRESETS)
def test_presets_run_and_keep_shapes(name, ndim):
    image, label = blobs(ndim)
    augmenter = Augmenter(augmentation_settings(name, ndim), ndim)
    for seed in range(4):
        out_image, out_label = augmenter(image, label, np.random.default_rng(seed))
        assert out_image.shape == image.shape and out_label.shape == label.shape
        assert out_image.dtype == np.float32 and set(np.unique(out_label)) <= {0, 1, 2}


def test_same_seed_same_result():
    image, label = blobs(3)
    augmenter = Augmenter(augmentation_settings("strong", 3), 3)
    a = augmenter(image, label, np.random.default_rng(7))
    b = augmenter(image, label, np.random.default_rng(7))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_default_preset_is_mirroring_and_overrides_add_transforms():
    assert augmentation_settings("default", 3) == {"flip": {"p": 0.5, "axes": None}}
    settings = augmentation_settings("default", 2, {"rotation": {"p": 0.2}})
    assert settings["rotation"] == {**TRANSFORMS["rotation"], "p": 0.2}


def test_light_preset_is_mild_affine_and_cheap():
    settings = augmentation_settings("light", 3)
    assert set(settings) == {"rotation", "scale", "noise", "brightness", "contrast", "gamma", "flip"}
    assert settings["rotation"]["angle"] == [-15.0, 15.0] and settings["scale"]["range"] == [0.85, 1.25]
    assert settings["flip"] == {"p": 0.5, "axes": None}
    # no elastic field: every spatial draw is affine, one scipy affine_transform per patch
    augmenter, rng = Augmenter(settings, 3), np.random.default_rng(0)
    draws = [augmenter.spatial_transform((16, 16, 16), rng) for _ in range(200)]
    fired = [d for d in draws if d is not None]
    assert 40 <= len(fired) <= 100  # rotation and scaling, p 0.2 each: 1 - 0.8^2 = 36 % of the draws
    assert all(displacement is None for _, displacement in fired)
    for matrix, _ in fired:  # rotation (orthogonal) times scaling: singular values equal, within 0.85..1.25
        singular = np.linalg.svd(matrix, compute_uv=False)
        assert singular.max() - singular.min() < 1e-9 and 0.85 - 1e-9 <= singular[0] <= 1.25 + 1e-9


def test_config_overrides_reach_the_settings():
    settings = augmentation_settings("strong", 3, {"rotation": {"p": 0.5}, "elastic": {"p": 0.1}, "flip": {"p": 0}})
    assert settings["rotation"]["p"] == 0.5 and settings["rotation"]["angle"] == [-30.0, 30.0]
    assert settings["elastic"] == {**TRANSFORMS["elastic"], "p": 0.1}
    assert settings["flip"]["p"] == 0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"twirl": {"p": 0.5}}, "unknown augmentation transform 'twirl'"),
        ({"rotation": {"prob": 0.5}}, r"augmentation.rotation has unknown option\(s\) \['prob'\]"),
        ({"rotation": {"p": 1.5}}, r"augmentation.rotation.p must be a probability"),
        ({"rotation": {"p": "often"}}, r"augmentation.rotation.p must be a probability"),
        ({"scale": {"range": [1.2, 0.8]}}, r"augmentation.scale.range must be a \[low, high\] pair"),
        ({"scale": {"range": [0.0, 1.0]}}, r"augmentation.scale.range must be positive"),
        ({"noise": {"std": 0.1}}, r"augmentation.noise.std must be a \[low, high\] pair"),
        ({"lowres": {"zoom": [0.5, 2.0]}}, r"augmentation.lowres.zoom must lie in \(0, 1\]"),
        ({"flip": {"axes": [3]}}, r"augmentation.flip.axes must be null or a list of spatial axes"),
        ({"gamma": {"retain_stats": "yes"}}, r"augmentation.gamma.retain_stats must be true or false"),
        ({"flip": 0.5}, r"augmentation.flip must be a mapping"),
    ],
)
def test_bad_settings_are_refused_with_the_value(overrides, message):
    with pytest.raises(ValueError, match=message):
        augmentation_settings("default", 3, overrides)


def test_unknown_preset_is_refused():
    with pytest.raises(ValueError, match="augment preset must be one of"):
        augmentation_settings("wild", 3)


def test_test_time_mirroring_follows_the_axes_the_training_mirrored():
    from utils.runs import TrainingConfig
    from utils.train.augment import mirrored_axes

    def config(augment, augmentation=None, patch=(8, 8, 8)):
        return TrainingConfig(patch_size=list(patch), augment=augment, augmentation=augmentation or {})

    assert mirrored_axes(config("default")) == [0, 1, 2]
    assert mirrored_axes(config("light")) == [0, 1, 2]
    assert mirrored_axes(config("strong", patch=(16, 16))) == [0, 1]
    assert mirrored_axes(config("none")) == []
    assert mirrored_axes(config("default", {"flip": {"p": 0.0}})) == []
    assert mirrored_axes(config("none", {"flip": {"p": 0.5, "axes": [2, 1]}})) == [1, 2]

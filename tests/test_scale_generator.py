"""``benchmarks/scale.py``, the full-size CT generator of the scale benchmark: deterministic in its arguments, the
label carried with the image, the spacing of the field of view it samples, and the bank that carries the sources.

Synthetic sources stand in for the real CTs of ``../shared/data`` (the tests run without it), at small sizes.
"""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import scale  # noqa: E402


def synthetic_sources() -> list[scale.Source]:
    """Two small 'CTs': soft tissue (40 HU) with a ball of class 1 (100 HU) and a box of class 2 (-800 HU)."""
    sources = []
    for name, shape, spacing in (("a", (12, 40, 36), (5.0, 0.8, 0.8)), ("b", (10, 30, 30), (3.0, 1.5, 1.5))):
        z, y, x = np.indices(shape)
        label = np.zeros(shape, np.uint8)
        label[(z - shape[0] / 2) ** 2 / 9 + (y - 12) ** 2 / 36 + (x - 12) ** 2 / 36 < 1] = 1
        label[:, 18:26, 20:30] = 2
        image = np.select([label == 1, label == 2], [100, -800], 40).astype(np.int16)
        sources.append(scale.Source(name, image, label, spacing))
    return sources


def test_a_case_is_the_same_for_the_same_arguments_and_differs_between_cases():
    sources = synthetic_sources()
    first, again = (scale.make_case(16, sources, seed=3, case=1, in_plane=48) for _ in range(2))
    np.testing.assert_array_equal(first.image, again.image)
    np.testing.assert_array_equal(first.label, again.label)
    assert (first.case_id, first.source, first.spacing) == (again.case_id, again.source, again.spacing)
    others = [scale.make_case(16, sources, seed=s, case=c, in_plane=48) for s, c in ((3, 2), (4, 1))]
    for other in others:
        assert other.spacing != first.spacing or not np.array_equal(other.image, first.image)


def test_the_case_has_its_size_dtypes_classes_and_the_spacing_of_its_field_of_view():
    sources = synthetic_sources()
    case = scale.make_case(16, sources, seed=0, case=0, in_plane=48)
    source = next(s for s in sources if s.name == case.source)
    assert case.image.shape == case.label.shape == (16, 48, 48)
    assert case.image.dtype == np.int16 and case.label.dtype == np.uint8
    assert set(np.unique(case.label).tolist()) <= {0, 1, 2} and (case.label == 2).any()
    nz, ny, nx = source.image.shape
    assert case.spacing[0] == pytest.approx(nz * source.spacing[0] / 16)  # the whole axial extent over 16 slices
    zoom = ny * source.spacing[1] / 48 / case.spacing[1]
    assert 0.85 <= zoom <= 1.15  # the in-plane extent zoomed by a factor drawn from [0.85, 1.15]
    assert case.spacing[1] / case.spacing[2] == pytest.approx(ny * source.spacing[1] / (nx * source.spacing[2]))


def test_the_label_stays_on_its_tissue_and_outside_the_source_is_air():
    """Image and label are sampled at the same positions (linear and nearest): each class keeps its intensity, and
    beyond the source lies air (-1024 HU), never labelled."""
    sources, air_cases = synthetic_sources(), 0
    for number in range(6):
        case = scale.make_case(16, sources, seed=0, case=number, in_plane=48)
        for k, hu in ((1, 100), (2, -800)):  # the median of a class's intensities is its own (borders are blurred)
            if (case.label == k).any():
                assert abs(np.median(case.image[case.label == k]) - hu) < 30, (number, k)
        assert np.isin(np.median(case.image[case.label == 0]), (40, scale.AIR_HU))
        air = case.image == scale.AIR_HU
        assert not (air & (case.label > 0)).any()
        air_cases += bool(air.any())
    assert air_cases > 0  # shifted or zoomed out beyond the source in some cases


def test_the_bank_carries_the_sources_and_the_command_line_writes_the_same_cases(tmp_path):
    sources = synthetic_sources()
    bank = scale.save_bank(sources, tmp_path / "bank.npz")
    loaded = scale.load_bank(bank)
    assert [s.name for s in loaded] == ["a", "b"]
    for original, copy in zip(sources, loaded, strict=True):
        np.testing.assert_array_equal(original.image, copy.image)
        assert original.spacing == copy.spacing
    for out in ("one", "two"):
        arguments = ["--bank", str(bank), "--output", str(tmp_path / out), "--sizes", "8", "12", "--in-plane", "32"]
        assert scale.main([*arguments, "--format", "npy", "--cases", "2"]) == 0
    written = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert len(written) == 2 * 2 * 3
    for name in written:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    expected = scale.make_case(12, sources, seed=0, case=1, in_plane=32)
    np.testing.assert_array_equal(np.load(tmp_path / "one" / "ct_12_001_image.npy"), expected.image)
    assert scale.main(["--bank", str(tmp_path / "missing.npz"), "--output", str(tmp_path / "x")]) == 2
    with pytest.raises(ValueError, match="at least 8 voxels"):
        scale.make_case(4, sources)

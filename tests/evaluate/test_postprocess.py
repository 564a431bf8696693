"""Post-processing: largest connected component, small components, and the validation decision, on hand-made masks."""

import math

import numpy as np
import pytest

from utils.evaluate.postprocess import (
    apply_plan,
    decide_lcc,
    keep_largest_component,
    make_plan,
    parse_min_size,
    remove_small_components,
)
from utils.evaluate.report import mean_dice


def hand_made():
    """Class 1: a 3x3x3 cube (27) and a 2x2x2 cube (8) apart; class 2: a 4-voxel bar and a single voxel."""
    labels = np.zeros((10, 10, 10), dtype=np.uint8)
    labels[1:4, 1:4, 1:4] = 1
    labels[6:8, 6:8, 6:8] = 1
    labels[0, 8, 0:4] = 2
    labels[9, 0, 9] = 2
    return labels


def test_lcc_keeps_the_largest_component_of_each_class():
    labels = hand_made()
    out = keep_largest_component(labels)
    expected = np.zeros_like(labels)
    expected[1:4, 1:4, 1:4] = 1
    expected[0, 8, 0:4] = 2
    np.testing.assert_array_equal(out, expected)
    assert labels.sum() == 27 + 8 + 2 * 5  # the input is not changed


def test_lcc_only_for_the_given_classes_and_by_connectivity():
    labels = hand_made()
    out = keep_largest_component(labels, classes=[2])
    assert (out == 1).sum() == 35 and (out == 2).sum() == 4
    diagonal = np.zeros((3, 3), dtype=np.uint8)
    diagonal[0, 0] = diagonal[1, 1] = diagonal[2, 2] = 1
    assert keep_largest_component(diagonal).sum() == 1  # face connectivity: three components
    assert keep_largest_component(diagonal, connectivity=2).sum() == 3  # 8-connectivity: one


def test_small_components_are_removed_in_voxels_or_mm3():
    labels = hand_made()
    out = remove_small_components(labels, 8)
    assert (out == 1).sum() == 35 and (out == 2).sum() == 0  # the 8-voxel cube stays, sizes 4 and 1 go
    out = remove_small_components(labels, 9)
    assert (out == 1).sum() == 27
    out = remove_small_components(labels, 30, "mm3", spacing=(2.0, 1.0, 1.0))  # 8 voxels = 16 mm3, 27 = 54 mm3
    assert (out == 1).sum() == 27
    with pytest.raises(ValueError, match="spacing"):
        remove_small_components(labels, 30, "mm3")


@pytest.mark.parametrize(
    ("text", "expected"),
    [("50", (50.0, "voxels")), ("50voxels", (50.0, "voxels")), ("30mm3", (30.0, "mm3")), ("0.5ml", (500.0, "mm3"))],
)
def test_min_size_parsing(text, expected):
    assert parse_min_size(text) == expected


def test_bad_min_size_is_quoted():
    with pytest.raises(ValueError, match="'5 cm'"):
        parse_min_size("5 cm")


def test_plans_apply_lcc_then_min_size():
    labels = hand_made()
    assert apply_plan(labels, make_plan("none", 3)) is labels
    out = apply_plan(labels, make_plan("lcc", 3, min_size=(5, "voxels")))
    assert (out == 1).sum() == 27 and (out == 2).sum() == 0


def test_decision_keeps_lcc_only_where_validation_dice_rises():
    """Class 1: the truth is one blob and the prediction adds a false island (lcc helps). Class 2: the truth has two
    blobs that the prediction finds (lcc would drop one)."""
    truth = np.zeros((12, 12, 12), dtype=np.uint8)
    truth[1:5, 1:5, 1:5] = 1
    truth[8:11, 8:11, 1:3] = 2
    truth[8:10, 1:3, 8:10] = 2
    prediction = truth.copy()
    prediction[9:11, 9:11, 8:11] = 1
    plan = decide_lcc([(prediction, truth, (1.0, 1.0, 1.0))], 3)
    assert plan["lcc_classes"] == [1]
    assert plan["dice"]["1"]["with_lcc"] == 1.0 and plan["dice"]["1"]["without_lcc"] < 1.0
    assert plan["dice"]["2"]["with_lcc"] < plan["dice"]["2"]["without_lcc"] == 1.0
    assert plan["num_cases"] == 1 and plan["decided_on"] == "validation"
    np.testing.assert_array_equal(apply_plan(prediction, plan), truth)


def test_a_class_no_case_scores_is_null_in_the_plan_and_nan_in_the_report():
    """The shared dice (NaN when both masks are empty) and mean serve two callers with different corners: the plan
    writes JSON ``null`` for a class that no validation case has and keeps its components; the report's mean dice of
    a case leaves such a class out and is NaN when nothing is left."""
    truth = np.zeros((6, 6, 6), dtype=np.uint8)
    truth[1:3, 1:3, 1:3] = 1
    plan = decide_lcc([(truth.copy(), truth, (1.0, 1.0, 1.0))], 3)
    assert plan["dice"]["2"] == {"without_lcc": None, "with_lcc": None} and plan["lcc_classes"] == []
    assert plan["dice"]["1"] == {"without_lcc": 1.0, "with_lcc": 1.0}
    record = {"id": "a", "metrics": {"1": {"dice": 1.0}, "2": {"dice": float("nan")}}}
    assert mean_dice(record, ["1", "2"]) == 1.0
    assert math.isnan(mean_dice({"id": "b", "metrics": {"2": {"dice": float("nan")}}}, ["2"]))

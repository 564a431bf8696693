"""Evaluation summaries and compatibility checks, with hand-computed values."""

import math

import pytest

from utils.evaluate import check_compatible, summarize


def record(case_id, dice_1, dice_2):
    return {"id": case_id, "metrics": {"1": {"dice": dice_1}, "2": {"dice": dice_2}}}


def test_summary_statistics_and_the_empty_rule():
    records = [
        record("a", 0.8, 0.6),
        record("b", 0.6, float("nan")),
        record("c", 1.0, 0.4),
        {"id": "unlabelled", "metrics": None},
    ]
    summary = summarize(records, {1: "anterior", 2: "posterior"}, ["dice"])
    first, second = summary["classes"]["1"], summary["classes"]["2"]
    assert first["name"] == "anterior"
    assert first["dice"]["mean"] == pytest.approx(0.8)
    assert first["dice"]["median"] == pytest.approx(0.8)
    assert first["dice"]["std"] == pytest.approx(math.sqrt((0.0**2 + 0.2**2 + 0.2**2) / 3), abs=1e-6)
    assert first["dice"]["q1"] == pytest.approx(0.7) and first["dice"]["q3"] == pytest.approx(0.9)
    assert second["dice"]["mean"] == pytest.approx(0.5)
    assert (second["dice"]["n"], second["dice"]["n_empty"]) == (2, 1)
    assert summary["foreground_mean"]["dice"] == pytest.approx(0.65)
    assert summary["num_cases"] == 4 and summary["num_scored"] == 3
    assert "NaN" in summary["empty_rule"]


class FakeDataset:
    path = "data/other"
    labels = {"0": "background", "1": "liver"}
    num_channels = 1


def test_incompatible_dataset_is_refused():
    with pytest.raises(ValueError, match="labels"):
        check_compatible({"labels": {"0": "background", "1": "tumour"}, "num_channels": 1}, FakeDataset())
    with pytest.raises(ValueError, match="channel"):
        check_compatible({"labels": FakeDataset.labels, "num_channels": 4}, FakeDataset())

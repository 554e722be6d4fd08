"""bcjax.report: the one place reports format durations, numbers and tables."""

import csv
import math
import warnings

import pytest

from bcjax import report


def test_duration():
    assert report.duration(0) == "0:00:00"
    assert report.duration(3723.9) == "1:02:03"
    assert report.duration(-5) == "0:00:00"


def test_number():
    assert report.number(0.12345) == "0.123"
    assert report.number(0.12345, 1) == "0.1"
    assert report.number(None) == "–"
    assert report.number(math.nan) == "–"
    assert report.number(None, missing="n/a") == "n/a"
    assert report.number(True) == "yes"
    assert report.number(7) == "7"
    assert report.number(1234.5, None) == "1,234.5"
    assert report.number(0.012345, None) == "0.0123"


def test_markdown_table_and_csv(tmp_path):
    rows = [{"a": 1, "b": 0.5}, {"a": 2, "b": None, "c": "extra"}]
    md = report.markdown_table(rows, ["a", "b"], headers=["A", "B"])
    assert md.splitlines() == ["| A | B |", "|---|---|", "| 1 | 0.500 |", "| 2 | – |"]
    report.write_csv(rows, tmp_path / "t.csv", ["a", "b"])
    with open(tmp_path / "t.csv") as f:
        assert list(csv.DictReader(f)) == [{"a": "1", "b": "0.5"}, {"a": "2", "b": ""}]


def test_deprecations_of_the_jax_stack_fail_the_suite():
    # pyproject's filterwarnings turns a DeprecationWarning attributed to jax
    # (or flax, optax, orbax, grain, chex, bcjax) into an error.
    with pytest.raises(DeprecationWarning):
        exec(
            "warnings.warn('old API', DeprecationWarning)",
            {"__name__": "jax._src.x", "warnings": warnings},
        )
    with pytest.raises(DeprecationWarning):
        exec(
            "warnings.warn('old API', DeprecationWarning)",
            {"__name__": "bcjax.y", "warnings": warnings},
        )

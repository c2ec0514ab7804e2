"""The demo's row status: a row far worse than fp32 is never shown without a word, and an expected one says why."""
from hf_efficient.cli import demo_report
from hf_efficient.cli.demo_rows import BY_NAME, ROWS


def test_broken_row_is_flagged_and_expected_one_gives_its_reason():
    row = {"name": "lut-int2-g64", "ppl": 600_000.0}
    plain = demo_report.status(row, 34.2)
    assert plain.startswith("BROKEN:") and "not meaningful" in plain
    reason = BY_NAME["lut-int2-g64"].expected_broken
    expected = demo_report.status(row, 34.2, reason)
    assert expected.startswith("BROKEN (expected)") and reason in expected and "17,544x" in expected


def test_reason_does_not_hide_a_row_that_works_or_failed():
    reason = "stated reason"
    assert demo_report.status({"name": "x", "ppl": 40.0}, 34.2, reason).startswith("ok")
    assert demo_report.status({"name": "x", "ppl": 60.0}, 34.2, reason).startswith("degraded")
    assert demo_report.status({"name": "x", "error": "boom"}, 34.2, reason).startswith("FAILED")


def test_only_rows_with_a_known_cause_are_expected_broken():
    # The 4-bit rows must stand on their own numbers; only the INT2 RTN row carries a stated cause.
    assert [r.name for r in ROWS if r.expected_broken] == ["lut-int2-g64"]

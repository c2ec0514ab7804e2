"""The quality benchmark's join of parts run one after another (no model: result files only)."""
import json

import pytest

from benchmarks.common import write_results
from benchmarks.quality_afpq_mofq import extend, merge


def _part(d, rows, **settings):
    write_results("quality_heldout", [{"name": "fp32", "ppl": 30.0, "ppl_plays": 30.0, "ppl_generated": 9.0}] + rows,
                  {"eval_split": "plays,generated", "code": "abc", "command": f"part {d.name}", **settings}, d)
    return str(d)


def test_merge_joins_parts_in_plan_order_and_extends(tmp_path):
    gptq = {"name": "INT4-asym g128 GPTQ", "ppl": 31.0, "ppl_plays": 31.0, "ppl_generated": 10.0}
    rtn = {"name": "INT4-asym g128 RTN", "ppl": 32.0, "ppl_plays": 32.0, "ppl_generated": 11.0}
    parts = [_part(tmp_path / "a", [gptq]), _part(tmp_path / "b", [rtn])]
    out = tmp_path / "out"
    out.mkdir()
    (out / "main.json").write_text(json.dumps({"settings": {}, "rows": [{"name": "old row", "table": "quality_heldout"},
                                                                        {"name": "main row"}]}))
    rows, settings = merge(parts, str(out), "quality_heldout")
    assert [r["name"] for r in rows] == ["fp32", rtn["name"], gptq["name"]]  # RTN rows come first in the plan
    assert "| name | ppl_plays | ppl_generated |" in (out / "quality_heldout.md").read_text()
    assert settings["command"].startswith("part a ; part b")
    extend("main", "quality_heldout", rows, settings, str(out))
    names = [r["name"] for r in json.loads((out / "main.json").read_text())["rows"]]
    assert names == ["main row", "fp32 [quality_heldout]", f"{rtn['name']} [quality_heldout]",
                     f"{gptq['name']} [quality_heldout]"]  # the table's earlier rows replaced, others kept


def test_merge_refuses_parts_of_other_code_or_settings(tmp_path):
    a = _part(tmp_path / "a", [])
    with pytest.raises(SystemExit, match="different settings or code"):
        merge([a, _part(tmp_path / "b", [], code="def")], str(tmp_path), "quality_heldout")
    with pytest.raises(SystemExit, match="different settings or code"):
        merge([a, _part(tmp_path / "c", [], eval_split="plays,news")], str(tmp_path), "quality_heldout")

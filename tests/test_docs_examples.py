"""Every fenced ```python example in README.md and docs/*.md runs as written, on the embedded model.

The blocks of one file run in order in one fresh interpreter (a later block may use names an earlier one
defined, as a reader would), in an empty working folder. A block that cannot run on a CPU machine or is a
fragment of a larger program says so on the line before its fence::

    <!-- docs-test: not run (needs a CUDA GPU with NVML) -->

and the reason is checked to be there; every other block must run without error.
"""
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```python[^\n]*\n(.*?)^```", re.S | re.M)
NOT_RUN = re.compile(r"<!--\s*docs-test:\s*not run\s*\(([^)]+)\)\s*-->\s*$")


def blocks(path: Path):
    """[(line, code, reason_not_run or None)] of the file's python blocks."""
    text = path.read_text()
    out = []
    for m in FENCE.finditer(text):
        before = text[:m.start()].rstrip("\n").splitlines()
        marker = NOT_RUN.search(before[-1]) if before else None
        out.append((text[:m.start()].count("\n") + 1, m.group(1), marker.group(1).strip() if marker else None))
    return out


RUNNABLE = [p for p in DOCS if any(reason is None for _, _, reason in blocks(p))]


def test_every_block_runs_or_says_why_not():
    assert RUNNABLE, "no runnable python example in the docs"
    for p in DOCS:
        for line, _, reason in blocks(p):
            assert reason is None or len(reason) > 8, f"{p.name}:{line}: give a reason a reader can act on"


@pytest.mark.slow
@pytest.mark.parametrize("doc", RUNNABLE, ids=lambda p: p.name)
def test_doc_examples_run(doc, tmp_path):
    parts = []
    for line, code, reason in blocks(doc):
        if reason is None:
            parts.append(f"print('--- {doc.name}:{line}', flush=True)\n{code}")
    script = tmp_path / f"{doc.stem}_examples.py"
    script.write_text("\n".join(parts))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=1500, cwd=tmp_path)
    assert r.returncode == 0, f"{doc.name} examples failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"

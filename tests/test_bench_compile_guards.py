"""benchmarks.compile_guards on a CPU: the CUDA fast path traced for CPU tensors, two decoder blocks."""
import pytest
import torch

from benchmarks.compile_guards import ROWS, run

LINEARS_PER_BLOCK = 7  # q, k, v, o, gate, up, down


@pytest.fixture(scope="module")
def rows():
    return {r["name"]: r for r in run(2, "cpu", rows=tuple(n for n in ROWS if "mma" not in n), rounds=1)}


def test_graph_inputs_count_each_layouts_tensors(rows):
    base = rows["nn.Linear"]["graph_inputs"]
    # the tinygemm layout's forward reads qweight and sz, the Triton layout's qweight, params and table
    for name, tensors in (("int4_asym (cuda-tinygemm)", 2), ("nf4_asym (cuda-triton)", 3)):
        assert rows[name]["graph_inputs"] - base == 2 * LINEARS_PER_BLOCK * (tensors - 1)


def test_rows_carry_times_and_ratios_against_the_same_run(rows):
    base = rows["nn.Linear"]
    assert base["guard_ratio"] == 1 and base["call_ratio"] == 1
    for r in rows.values():
        assert r["layers"] == 2 and 0 < r["guard_us"] < r["call_us"] and r["call_skip_guards_us"] > 0
        assert r["guard_ratio"] == pytest.approx(r["guard_us"] / base["guard_us"])
        assert r["skip_guards_ratio"] == pytest.approx(r["call_skip_guards_us"] / base["call_skip_guards_us"])


def test_cpu_run_leaves_no_cuda_path_registered(rows):
    from hf_efficient.quantization.linear import fast_paths_for
    from hf_efficient import formats

    assert all(name != "bench-cuda-path" for name, _ in fast_paths_for(formats.get_format("nf4_asym"), "cpu"))


def test_mma_row_is_skipped_without_the_extension(capsys):
    assert run(1, "cpu", rows=("nf4_asym (cuda-mma)",), rounds=1) == []
    assert "skipped" in capsys.readouterr().out

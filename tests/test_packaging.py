"""The package works outside its checkout: a wheel carries the recipes and the CLI; results stay tables."""
import json
import os
import re
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory):
    """A fresh venv holding only our wheel (built without the C++ extension: seconds, not minutes); torch,
    transformers & co. come from this interpreter's site-packages through a .pth file, so nothing is downloaded."""
    tmp = tmp_path_factory.mktemp("wheel")
    env = dict(os.environ, HF_EFFICIENT_NO_EXTENSION="1")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps", str(ROOT),
                        "-w", str(tmp / "dist")], capture_output=True, text=True, timeout=300, env=env, cwd=tmp)
    assert r.returncode == 0, r.stderr[-3000:]
    (whl,) = (tmp / "dist").glob("hf_efficient-*.whl")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    r = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", "--no-index",
                        str(whl)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    ours = [p for p in site.getsitepackages() if Path(p).is_dir()] or [sysconfig.get_paths()["purelib"]]
    # .pth lines are appended after the venv's own site-packages: the wheel's hf_efficient wins over any checkout
    (Path(purelib) / "deps_from_dev_env.pth").write_text("\n".join(ours) + "\n")
    return venv, tmp


def _run(venv, cwd, code):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HF_EFFICIENT_NO_EXTENSION")}
    return subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=cwd, env=env)


def test_wheel_holds_the_recipes_and_loads_them_outside_the_checkout(wheel_venv):
    venv, cwd = wheel_venv
    recipes = sorted(p.stem for p in (ROOT / "hub_configs").glob("*.json") if "quant_method" in p.read_text())
    code = ("import json, hf_efficient\n"
            "from hf_efficient.quantization.api import HUB_CONFIGS\n"
            f"names = {recipes!r}\n"
            "cfgs = {n: hf_efficient.load_quant_config(n).to_dict() for n in names}\n"
            "print(json.dumps({'file': hf_efficient.__file__, 'dir': str(HUB_CONFIGS), 'cfgs': cfgs}))")
    r = _run(venv, cwd, code)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["file"].startswith(str(venv)) and out["dir"].startswith(str(venv)), out  # not the checkout
    assert set(out["cfgs"]) == set(recipes) and len(recipes) >= 5
    assert out["cfgs"]["afpq-fp4-g128"]["fmt"] == "fp" and out["cfgs"]["afpq-fp4-g128"]["group_size"] == 128


def test_wheel_carries_the_kernel_sources(wheel_venv):
    """The mma kernel compiles from its CUDA sources on first use, so an installed wheel has to ship them."""
    _, tmp = wheel_venv
    (whl,) = (tmp / "dist").glob("hf_efficient-*.whl")
    names = set(zipfile.ZipFile(whl).namelist())
    cuda = {str(p.relative_to(ROOT)) for p in (ROOT / "hf_efficient" / "kernels" / "cuda").iterdir()}
    assert cuda and cuda <= names, sorted(cuda - names)
    assert "hf_efficient/kernels/quant_mma.py" in names and not any(n.startswith("kernels/") for n in names)


def test_wheel_installs_the_console_script(wheel_venv):
    venv, cwd = wheel_venv
    r = subprocess.run([str(venv / "bin" / "hf-efficient"), "quantize", "--help"], capture_output=True, text=True,
                       timeout=120, cwd=cwd)
    assert r.returncode == 0 and "--group-size" in r.stdout, r.stderr[-2000:]


def test_results_are_tables_not_a_notebook():
    # benchmarks/results keeps the current JSON + markdown (+ plot) of each benchmark: no raw logs, numbered runs
    # or profiler dumps.
    files = sorted(p.name for p in (ROOT / "benchmarks" / "results").iterdir() if p.is_file())
    assert files
    assert [f for f in files if not f.endswith((".json", ".md", ".png"))] == []
    assert [f for f in files if re.search(r"_run\d", f)] == []

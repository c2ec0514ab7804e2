import json
import os
import subprocess
import sys

import pytest

from hf_efficient.cli import main


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("eval", "bench", "demo"):
        assert cmd in out


def test_console_script_is_installed():
    exe = os.path.join(os.path.dirname(sys.executable), "hf-efficient")
    r = subprocess.run([exe, "eval", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--context" in r.stdout


@pytest.mark.parametrize("argv,message", [
    (["eval", "--model", "/definitely/not/here"], "model path /definitely/not/here does not exist"),
    (["eval", "--json", "/no/such/dir/out.json"], "output folder /no/such/dir does not exist"),
    (["bench", "--device", "cuda:7"], None),
    (["demo", "--rows", "fp32,nonsense"], "unknown demo row"),
])
def test_one_line_errors(argv, message, capsys, tiny_llama_dir):
    if argv[0] == "demo":
        argv = argv + ["--model", str(tiny_llama_dir)]
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "error:" in err
    if message:
        assert message in err


def test_unwritable_output_dir(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    if os.access(ro, os.W_OK):  # root ignores permission bits
        ro = tmp_path / "a_file"
        ro.write_text("x")
    rc = main(["eval", "--json", str(ro / "out.json")])
    assert rc == 2 and "output folder" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["eval", "--context", "0"], ["eval", "--max-tokens", "x"],
                                  ["eval", "--dtype", "int3"], ["nosuchcommand"], []])
def test_bad_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_eval_and_demo_on_a_local_model(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "eval.json"
    rc = main(["eval", "--model", str(tiny_llama_dir), "--context", "64", "--max-tokens", "200",
               "--json", str(out), "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| model | PPL |" in printed and "sample:" in printed
    res = json.loads(out.read_text())["results"][0]
    assert res["ppl"] > 1.0
    rc = main(["demo", "--model", str(tiny_llama_dir), "--rows", "fp32", "--context", "64", "--max-tokens", "100",
               "--prompt-len", "8", "--new-tokens", "2", "--repeats", "1", "--no-progress"])
    assert rc == 0 and "| fp32 |" in capsys.readouterr().out

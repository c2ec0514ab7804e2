import json
import os
import subprocess
import sys

import pytest
import torch

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


def test_demo_runs_rows_in_fresh_processes_and_writes_a_report(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "report"
    rc = main(["demo", "--model", str(tiny_llama_dir), "--rows", "fp32,lut-int2-g64", "--context", "64",
               "--max-tokens", "100", "--prompt-len", "8", "--new-tokens", "2", "--repeats", "1", "--no-progress",
               "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0
    for text in ("== row 1/2 fp32", "== row 2/2 lut-int2-g64", "| fp32 |", "| lut-int2-g64 |", "Rows:", "Columns:",
                 "Kernels:", "report written:"):
        assert text in printed, text
    report = json.loads((out / "demo.json").read_text())
    fp32, lut = report["rows"]
    assert fp32["extra"]["kernel"].startswith("float") and fp32["status"] == "ok"
    assert sum(lut["extra"]["kernel_calls"].values()) > 0  # the census saw the quantized layers run
    for r in (fp32, lut):
        # each row's own process: its peak is above the pre-model baseline, and both are real numbers
        assert r["peak_mem_mb"] > r["extra"]["baseline_rss_mb"] > 50 and r["extra"]["row_mem_mb"] > 0
        assert set(r["extra"]["timings_s"]) >= {"perplexity", "speed", "sample"}
    assert (out / "demo.md").read_text().count("| lut-int2-g64 |") == 1
    assert (out / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("ppl,expect", [(30.0, "ok"), (36.0, "ok"), (40.0, "degraded"), (591391.0, "BROKEN"),
                                        (float("nan"), "BROKEN")])
def test_demo_flags_broken_rows(ppl, expect):
    from hf_efficient.cli.demo_report import status

    assert status({"name": "x", "ppl": ppl}, baseline_ppl=30.0).startswith(expect)


def test_help_imports_neither_torch_nor_transformers():
    # The console script sets argv[0] to hf-efficient; `import hf_efficient` then defers registration.
    code = ("import sys; sys.argv[0] = 'hf-efficient'\n"
            "from hf_efficient.cli import main\n"
            "for argv in (['--help'], ['quantize', '--help'], ['demo', '--help']):\n"
            "    try:\n"
            "        main(argv)\n"
            "    except SystemExit:\n"
            "        pass\n"
            "print('HEAVY', sorted(m for m in ('torch', 'transformers', 'datasets') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "HEAVY []" in r.stdout


def _subparsers():
    import argparse

    from hf_efficient.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


def test_every_option_has_help_and_shows_its_default():
    missing = [f"{name} {'/'.join(a.option_strings)}" for name, p in _subparsers().items() for a in p._actions
               if a.option_strings and a.dest != "help" and not a.help]
    assert not missing
    text = _subparsers()["eval"].format_help()
    assert "(default: 2048)" in text  # --context


def test_demo_help_lists_the_rows():
    from hf_efficient.cli.demo_rows import ROWS

    text = " ".join(_subparsers()["demo"].format_help().split())
    for row in ROWS:
        assert row.name in text


@pytest.mark.parametrize("method", ["afpq", "mofq", "lut"])
def test_quantize_defaults_are_the_config_class_defaults(method, tmp_path):
    from hf_efficient import registry
    from hf_efficient.cli.quantize import config_from_args

    args = _subparsers()["quantize"].parse_args(["--out", str(tmp_path), "--method", method])
    cfg = config_from_args(args)
    assert cfg.to_dict() == registry.register_all().quantization[method].config_cls().to_dict()


def test_quantize_options_override_a_recipe(tmp_path):
    from hf_efficient.cli.quantize import config_from_args

    args = _subparsers()["quantize"].parse_args(["--out", str(tmp_path), "--config", "afpq-nf3-g64",
                                                 "--group-size", "32", "--algorithm", "rtn"])
    cfg = config_from_args(args)
    assert (cfg.quant_method, cfg.bits, cfg.fmt, cfg.group_size, cfg.algorithm) == ("afpq", 3, "nf", 32, "rtn")


def test_quantize_refuses_options_of_another_method(tmp_path, capsys):
    rc = main(["quantize", "--out", str(tmp_path), "--method", "mofq", "--fmt", "nf"])
    assert rc == 2 and "--fmt/--symmetric apply to afpq and lut" in capsys.readouterr().err


def test_quantize_records_measured_perplexity_in_the_model_card(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "q"
    rc = main(["quantize", "--model", str(tiny_llama_dir), "--out", str(out), "--method", "afpq", "--group-size", "32",
               "--eval-tokens", "150", "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    ppl = float(printed.split("perplexity ")[1].split()[0])
    card = (out / "README.md").read_text()
    assert f"| perplexity | {ppl:.3f} (150 held-out tokens" in card and "| algorithm | rtn" in card


def test_main_restores_the_thread_count(tiny_llama_dir, tmp_path):
    """`--threads` is the command's setting; main() run in-process leaves the caller's thread count as it was."""
    before = torch.get_num_threads()
    target = 1 if before != 1 else 2
    rc = main(["eval", "--model", str(tiny_llama_dir), "--context", "32", "--max-tokens", "64", "--threads",
               str(target), "--json", str(tmp_path / "e.json"), "--no-progress"])
    assert rc == 0
    assert torch.get_num_threads() == before

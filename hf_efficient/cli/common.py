"""Argument helpers and the one-line error type shared by every subcommand (light: argparse only)."""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

DTYPES = ("float32", "bfloat16", "float16")


class CliError(Exception):
    """An error the CLI reports as one line and exit code 2."""


def load_errors() -> tuple[type[BaseException], ...]:
    """Errors of the library that mean bad input (a missing model, a corrupt checkpoint ...): one line, exit 2.

    Imported only once a command runs, so ``--help`` stays light."""
    errors: list[type[BaseException]] = []
    for mod, name in (("hf_efficient.models", "ModelLoadError"), ("hf_efficient.data", "CorpusError"),
                      ("hf_efficient.integrations.transformers", "QuantizationLoadError"),
                      ("hf_efficient.checkpoint", "CheckpointError")):
        try:
            errors.append(getattr(__import__(mod, fromlist=[name]), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def check_writable_file(path: str | None) -> Path | None:
    """Fail before any work if ``path``'s folder does not exist or cannot be written."""
    if path is None:
        return None
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise CliError(f"output folder {parent} does not exist")
    check_writable_dir(parent)
    return p


def check_writable_dir(folder: Path) -> None:
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".hfe-write-test-"):
            pass
    except OSError as e:
        raise CliError(f"cannot write to output folder {folder}: {e.strerror or e}")


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}")
    if not 0 <= v < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1), got {v}")
    return v


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="local Hugging Face model directory (None: the embedded "
                                                  "SmolLM2-135M-Instruct)")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (None: cuda if available, else cpu)")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="weights/activation dtype")
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads for torch (None: torch's)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON to FILE")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--context", type=positive_int, default=2048, help="perplexity window in tokens")
    p.add_argument("--stride", type=positive_int, default=None, help="window step (None: context/2)")
    p.add_argument("--max-tokens", type=positive_int, default=8192,
                   help="held-out tokens to score (the eval plays hold ~290k)")


def add_speed_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt-len", type=positive_int, default=128, help="prompt tokens for prefill")
    p.add_argument("--new-tokens", type=positive_int, default=32, help="decoded tokens")
    p.add_argument("--batch", type=positive_int, default=1, help="batch size")
    p.add_argument("--repeats", type=positive_int, default=3, help="timed repeats, median reported")


_threads_before: list[int] = []


def setup_runtime(args) -> str:
    """Offline mode, thread count and device check; returns the device string."""
    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a hub at run time
    if getattr(args, "threads", None):
        _threads_before.append(torch.get_num_threads())
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CliError(f"--device {device} requested but CUDA is not available")
    return device


def restore_runtime() -> None:
    """Undo :func:`setup_runtime`'s process-wide thread count: ``main()`` also runs in-process (tests, notebooks),
    where a later computation must not silently run on the command's thread count."""
    if _threads_before:
        import torch

        torch.set_num_threads(_threads_before[0])
        _threads_before.clear()


def torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def report(results, args, settings) -> None:
    """Print the results table and samples; write JSON when ``--json`` was given."""
    from ..evaluation import format_table, write_json

    print(format_table(results))
    for r in results:
        if r.sample:
            print(f"\n[{r.name}] sample: {r.sample}")
    if args.json:
        write_json(results, args.json, settings)
        print(f"\nwrote {args.json}")

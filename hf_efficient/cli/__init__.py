"""``hf-efficient`` console script.

Each subcommand is one module of this package that defines ``HELP`` (one line), ``configure(parser)``
(adds its arguments) and ``run(args) -> int``. Command modules import only ``argparse`` and
:mod:`hf_efficient.cli.common` at module level, so ``hf-efficient --help`` and ``hf-efficient CMD --help``
never import torch or transformers; the work's imports happen inside ``run``.

Adding a subcommand is one line: write ``hf_efficient/cli/<module>.py`` with ``HELP``, ``configure`` and
``run``, then add ``"<command-name>": "<module>",`` to :data:`COMMANDS` below.

Capability packages (``quantization``, ``attention``, ``optim`` ...) never import this package: the
dependencies run kernels <- capabilities <- integrations <- cli.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

# command name -> module of this package. Order is the order of ``--help``.
COMMANDS: dict[str, str] = {
    "eval": "eval",
    "bench": "bench",
    "demo": "demo",
    "quantize": "quantize",
    "train-gate": "train_gate",
    "adama-demo": "adama_demo",
    "energy-tune": "energy",
    "distill": "distill",
}


def command_module(name: str):
    return importlib.import_module(f"{__name__}.{COMMANDS[name]}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-efficient",
        description="Efficient-LLM tools on Hugging Face models. Runs offline on the embedded "
                    "SmolLM2-135M-Instruct unless --model names a local model directory.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        mod = command_module(name)
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        mod.configure(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .common import CliError, load_errors, restore_runtime

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        # `import hf_efficient` skips this under the console script, so that --help stays light.
        from .. import registry

        registry.register_all()
        return int(args._run(args) or 0)
    except CliError as e:
        print(f"hf-efficient {args.command}: error: {e}", file=sys.stderr)
        return 2
    except load_errors() as e:
        print(f"hf-efficient {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        restore_runtime()


if __name__ == "__main__":
    sys.exit(main())

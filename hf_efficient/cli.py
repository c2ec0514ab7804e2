"""``hf-efficient`` console script: one subcommand per registered :class:`~hf_efficient.registry.Command`."""
from __future__ import annotations

import argparse
import logging
import sys

from . import registry


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-efficient",
        description="Efficient-LLM tools on Hugging Face models. Runs offline on the embedded "
                    "SmolLM2-135M-Instruct unless --model names a local model directory.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for cmd in registry.register_all().commands.values():
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        cmd.configure(p)
        p.set_defaults(_run=cmd.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .commands import CliError
    from .data import CorpusError
    from .models import ModelLoadError

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args._run(args) or 0)
    except (CliError, ModelLoadError, CorpusError) as e:
        print(f"hf-efficient {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

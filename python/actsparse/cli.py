"""The `actsparse` command: one subcommand per job."""

from __future__ import annotations

import argparse
import sys

from . import __version__, convert, sparsity_info
from .options import add_command


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="actsparse",
        description="Training-free activation sparsity (CHESS) for llama.cpp / GGUF models.",
    )
    p.add_argument("--version", action="version", version=f"actsparse {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    add_command(sub, "convert", convert.add_arguments, convert.ConvertOptions, convert.run,
                help="calibrate thresholds and write a sparse GGUF")  # fmt: skip

    sparsity_info.add_cli(sub)

    from . import models

    models.add_cli(sub)

    from . import benchmark, demo, evaluate, report

    demo.add_cli(sub)
    evaluate.add_cli(sub)
    benchmark.add_cli(sub)
    report.add_cli(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `actsparse inspect FILE | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())

"""The ``pyrank`` command (also ``python -m pyrank``)."""
from __future__ import annotations

import argparse
import sys


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pyrank",
        description="Streaming low-rank SVD of LLM weight updates W_t - W_0.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    env = sub.add_parser(
        "env",
        help="print versions and which backends are available (and why not)",
        description="Print versions, devices, CPU features and the status of every backend.",
        epilog="example:  pyrank env",
    )
    env.set_defaults(func=_cmd_env)
    return p


def _cmd_env(args) -> int:
    from .env import report

    print(report())
    return 0


def main(argv=None) -> int:
    args = _build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

"""fedvision: federated, differentially private training of vision models, and its audit.

Each sub-command lives next to the code it drives and registers itself through ``add_parser(subparsers)``;
this file only wires them together and turns user errors into one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, Sequence

from fedvision import __version__
from fedvision.errors import FedVisionError

# (module, attribute) of each sub-command's ``add_parser``; imported lazily so `fedvision --help` is fast
# and one sub-command's heavy imports (Flower, torch) do not slow the others.
SUBCOMMANDS: list[tuple[str, str]] = [
    ("fedvision.data.cli", "add_parser"),
    ("fedvision.federation_cli", "add_parser"),
    ("audit.cli", "add_parser"),
    ("fedvision.certs", "add_parser"),
    ("fedvision.site_cli", "add_parser"),
]


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(prog="fedvision", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"fedvision {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module, attr in SUBCOMMANDS:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name and module.startswith(e.name):  # sub-command not built yet
                continue
            raise
        getattr(mod, attr)(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    handler: Callable[[argparse.Namespace], int] | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    try:
        return int(handler(args) or 0)
    except FedVisionError as e:
        print(f"fedvision: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedvision: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

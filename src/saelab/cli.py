"""The `saelab` command.

Each command family lives in its own module exposing `register(subparsers)`; this file only
collects them, so adding a command never touches the others. A command handler receives the
parsed `argparse.Namespace` and returns an exit code. User errors (`SaelabError`) print one
clear line and exit 2 instead of a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from saelab.errors import SaelabError

# Modules that add subcommands; each has `register(subparsers) -> None`.
COMMAND_MODULES = [
    "saelab.commands",  # demo, train, eval
    "saelab.uand.cli",  # uand EXPERIMENT
    "saelab.models.cli",  # harvest, fidelity, inspect, steer (real models)
    "saelab.bench.cli",  # bench toy
    "saelab.io.cli",  # convert (other libraries' SAE files -> SAELens v6)
    "saelab.reading.cli",  # dashboard (reading latents)
    "saelab.reading.interp_cli",  # autointerp, patchscope
    "saelab.diffing.cli",  # diff (two-model crosscoders)
    "saelab.diffing.elephant",  # elephant (attribute bundles, stage-wise diffing)
    "saelab.models.finetune",  # finetune (a model pair with a planted trigger)
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="saelab",
        description="saelab: sparse autoencoders, ground-truth toy worlds and computation in superposition.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # a command family not built yet
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except SaelabError as exc:
        print(f"saelab {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""The `appliance` command: argument parsing and printing only; every verb calls one function elsewhere.

local.py holds the verbs that work on this machine (spec, build, boot, flash,
PXE), nodes.py those that ask nodes' agents over SSH.
"""

from __future__ import annotations

import argparse
import json
import sys

from appliance import __version__
from appliance.cli.lifecycle import add_lifecycle_verbs
from appliance.cli.local import add_local_verbs
from appliance.cli.nodes import add_node_verbs
from appliance.cli.output import error_json
from appliance.cli.parsing import ArgumentParser, CommandLineError, HelpFormatter
from appliance.errors import ApplianceError

EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    # Typed as argparse's own: its subparsers are made of the same class, CommandLineError included.
    parser: argparse.ArgumentParser = ArgumentParser(
        prog="appliance",
        formatter_class=HelpFormatter,
        description="Build a minimal hypervisor appliance image (kernel, KVM, QEMU, agent), boot it,\n"
        "and run guests on the nodes it makes.",
        epilog="example:\n"
        "  appliance init appliance.toml\n"
        "  appliance build appliance.toml -o out --authorized-key ~/.ssh/id_ed25519.pub\n"
        "  appliance boot out --wait\n"
        "  appliance node report appliance@127.0.0.1:2222",
    )
    parser.add_argument("--version", action="version", version=f"appliance {__version__}")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    add_local_verbs(verbs)
    add_node_verbs(verbs)
    add_lifecycle_verbs(verbs)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = build_parser().parse_args(argv)
    except CommandLineError as error:
        sys.stderr.write(error.usage)
        print(error, file=sys.stderr)
        if "--json" in argv:
            print(error_json(error))
        return error.exit_code
    as_json = bool(getattr(args, "json", False))
    try:
        code: int = args.run(args)
        return code
    except ApplianceError as error:
        print(f"appliance: {error}", file=sys.stderr)
        if as_json:
            print(error_json(error))
        return error.exit_code
    except KeyboardInterrupt:
        print("appliance: interrupted", file=sys.stderr)
        if as_json:
            print(json.dumps({"error": {"code": "interrupted", "message": "interrupted"}}))
        return EXIT_INTERRUPTED

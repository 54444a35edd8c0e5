"""Verbs of a node's own life: install from the ISO, upgrade, roll back, fleets in waves (appliance.nodes.upgrade)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from appliance.cli.output import as_json, format_table
from appliance.cli.parsing import HelpFormatter, Verbs, add_connection_options, add_key_options, node_connector
from appliance.errors import EXIT_FAILED
from appliance.nodes.client import parse_address
from appliance.nodes.inventory import load_inventory
from appliance.nodes.upgrade import (
    DEFAULT_WAIT_SECONDS,
    GUEST_STOP_SECONDS,
    UpgradeOptions,
    load_build,
    upgrade_fleet,
    upgrade_node,
)
from appliance.progress import Progress

EXIT_OK = 0


def add_install_verbs(node_verbs: Verbs) -> None:
    install = node_verbs.add_parser(
        "install",
        formatter_class=HelpFormatter,
        help="install a node booted from the ISO onto one of its disks",
        description="Write the running build onto DISK as the disk image lays it out (BIOS and UEFI boot,\n"
        "root slots A and B, a data partition over the rest of the disk holding the node's state, SSH\n"
        "host key and first-boot configuration). A disk with partitions or any signature is refused\n"
        "unless --wipe; the disk booted from, or one in use, always. Refused while guests run.",
        epilog="example:\n  appliance node disks node1\n  appliance node install node1 --disk /dev/sda --reboot",
    )
    add_connection_options(install)
    install.add_argument("--disk", required=True, metavar="DEVICE", help="the whole disk, e.g. /dev/sda")
    install.add_argument("--wipe", action="store_true", help="erase a disk that has partitions or signatures")
    install.add_argument("--reboot", action="store_true", help="reboot once installed (remove the ISO first)")
    install.set_defaults(run=cmd_node_install)
    disks = node_verbs.add_parser("disks", help="the node's disks, and which an install would take")
    add_connection_options(disks)
    disks.set_defaults(run=cmd_node_disks)


def add_lifecycle_verbs(verbs: Verbs) -> None:
    upgrade = verbs.add_parser(
        "upgrade",
        formatter_class=HelpFormatter,
        help="send a new build into the root slot a node does not run, and try it",
        description="Check DIR (a build of the node's spec, for its architecture, that fits its slot), send\n"
        "its kernel, initrd and squashfs into the slot the node does not run (each file's sha256\n"
        "checked against the manifest by the node; files the running slot holds already are not sent),\n"
        "and arm one trial boot of it. The build the node runs is a no-op; a cut-off upgrade run again\n"
        "sends only what is missing. Refused while guests run unless --stop-guests. On the trial boot\n"
        "the node checks its health ([upgrade] in the spec) and makes the new build the default, or\n"
        "goes back to the old one by itself.",
        epilog="example:\n  appliance upgrade node1 out --reboot --wait\n  appliance rollback node1 --reboot",
    )
    add_connection_options(upgrade)
    upgrade.add_argument("dir", type=Path, help="build directory (holds manifest.json)")
    add_upgrade_options(upgrade)
    upgrade.set_defaults(run=cmd_upgrade, timeout=300.0)
    rollback = verbs.add_parser(
        "rollback",
        formatter_class=HelpFormatter,
        help="make the build a node ran before the default again",
        epilog="example:\n  appliance rollback node1 --reboot",
    )
    add_connection_options(rollback)
    rollback.add_argument("--reboot", action="store_true", help="reboot into it now")
    rollback.set_defaults(run=cmd_rollback)


def add_upgrade_options(parser: argparse.ArgumentParser, always_reboots: bool = False) -> None:
    parser.add_argument(
        "--stop-guests", action="store_true", help="stop running guests (ACPI) once the slot is written"
    )
    parser.add_argument(
        "--timeout-stop", dest="stop_timeout", type=int, default=GUEST_STOP_SECONDS, metavar="SECONDS",
        help="with --stop-guests: force a guest off after this long (default: %(default)s)",
    )  # fmt: skip
    if not always_reboots:
        parser.add_argument("--reboot", action="store_true", help="reboot into the trial (else it waits for a reboot)")
        parser.add_argument("--wait", action="store_true", help="with --reboot: wait until the node judged the trial")
    parser.add_argument(
        "--wait-timeout", type=float, default=DEFAULT_WAIT_SECONDS, metavar="SECONDS",
        help="how long to wait for the verdict (default: %(default)s)",
    )  # fmt: skip


def add_fleet_upgrade_verb(fleet_verbs: Verbs) -> None:
    parser = fleet_verbs.add_parser(
        "upgrade",
        formatter_class=HelpFormatter,
        help="upgrade nodes in waves, each rebooted and waited for; stops at the first that rolls back",
        epilog="example:\n  appliance fleet upgrade -i hosts.ini out --max-parallel 2",
    )
    parser.add_argument(
        "-i", "--inventory", type=Path, required=True, help="Ansible INI or YAML inventory, or a host list"
    )
    parser.add_argument("dir", type=Path, help="build directory (holds manifest.json)")
    parser.add_argument("--max-parallel", type=int, default=1, help="nodes per wave (default: %(default)s)")
    add_upgrade_options(parser, always_reboots=True)
    add_key_options(parser, timeout=300.0)
    parser.set_defaults(run=cmd_fleet_upgrade)


def step_printer() -> tuple[Progress, Callable[[str], None]]:
    progress = Progress(sys.stderr, interactive=sys.stderr.isatty())
    return progress, progress.note


def cmd_node_disks(args: argparse.Namespace) -> int:
    with node_connector(args)(parse_address(args.host)) as node:
        result = node.call("node.disks", idempotent=True)
    if args.json:
        print(as_json(result))
    else:
        print(format_table([{**disk, "in_use": "; ".join(disk["in_use"])} for disk in result]))
    return EXIT_OK


def cmd_node_install(args: argparse.Namespace) -> int:
    progress, say = step_printer()
    with node_connector(args)(parse_address(args.host)) as node:
        with progress.step(f"install {args.host} onto {args.disk}"):
            result = node.call("node.install", {"disk": args.disk, "wipe": args.wipe},
                               on_progress=lambda params: say(str(params.get("text", ""))))  # fmt: skip
        if args.reboot:
            node.call("node.reboot")
    if args.json:
        print(as_json(result))
    else:
        after = "; rebooting" if args.reboot else "; remove the ISO and reboot to run from the disk"
        print(f"installed {result['build_id']} on {result['disk']} in {result['seconds']:.0f}s{after}")
    return EXIT_OK


def cmd_upgrade(args: argparse.Namespace) -> int:
    build = load_build(args.dir)
    progress, say = step_printer()

    def sent(name: str, done: int, size: int) -> None:
        progress.detail(f"{name}: {done * 100 // max(size, 1)}% of {size / 1e6:.1f} MB")

    options = UpgradeOptions(args.stop_guests, args.stop_timeout, args.reboot, args.wait_timeout if args.wait else 0.0)
    with progress.step(f"upgrade {args.host} to {build.manifest.build_id}"):
        outcome = upgrade_node(node_connector(args), parse_address(args.host), build, options, say, sent)
    if args.json:
        print(as_json(vars(outcome)))
    elif outcome.noop:
        print(f"{args.host}: nothing to do: {outcome.reason}")
    else:
        figures = ", ".join(f"{key} {value:.1f}s" for key, value in outcome.seconds.items())
        print(f"{args.host}: {build.manifest.build_id} in slot {outcome.slot} "
              f"({outcome.sent_bytes / 1e6:.1f} MB sent; {figures})")  # fmt: skip
        if outcome.result:
            print(f"{args.host}: {outcome.result}{': ' + outcome.reason if outcome.reason else ''}")
        elif outcome.rebooted:
            print(f"{args.host}: rebooting into the trial (see `appliance node report {args.host}`)")
        else:
            print(f"{args.host}: armed; the next reboot tries it")
    return EXIT_OK


def cmd_rollback(args: argparse.Namespace) -> int:
    with node_connector(args)(parse_address(args.host)) as node:
        result = node.call("upgrade.rollback")
        if args.reboot:
            node.call("node.reboot")
    if args.json:
        print(as_json(result))
    else:
        when = "rebooting into it" if args.reboot else "the next boot runs it"
        print(f"{args.host}: slot {result['default']} ({result['build_id']}) is the default again; {when}")
    return EXIT_OK


def cmd_fleet_upgrade(args: argparse.Namespace) -> int:
    entries = load_inventory(args.inventory)
    build = load_build(args.dir)
    _, say = step_printer()
    options = UpgradeOptions(args.stop_guests, args.stop_timeout, reboot=True, wait=args.wait_timeout)
    outcomes = upgrade_fleet(entries, node_connector(args), build, args.max_parallel, options, say)
    if args.json:
        print(as_json([vars(outcome) for outcome in outcomes]))
    else:
        print(format_table([{"host": o.name, "status": o.status, "detail": o.detail[:80]} for o in outcomes]))
    return EXIT_OK if all(outcome.ok for outcome in outcomes) else EXIT_FAILED

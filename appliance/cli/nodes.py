"""Verbs that ask nodes' agents over SSH: node, guest, image, kept, fleet.

Every agent method has a verb; each verb is one request (image push: a
request and its data). Tables and fields for people, `--json` for scripts.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.cli.lifecycle import add_fleet_upgrade_verb, add_install_verbs
from appliance.cli.migrate import add_migration_verbs
from appliance.cli.output import as_json, format_fields, format_table, human_time
from appliance.cli.parsing import (
    HelpFormatter,
    Verbs,
    add_connection_options,
    add_key_options,
    disk_size,
    local_port,
    node_connector,
)
from appliance.errors import EXIT_FAILED
from appliance.nodes.client import check_image_upload, parse_address
from appliance.nodes.definitions import GuestOptions, guest_params, load_definition_file
from appliance.nodes.fleet import DEFAULT_CONCURRENCY, HostOutcome, fan_out
from appliance.nodes.inventory import load_inventory
from appliance.nodes.relay import (
    ESCAPE_NAME,
    LOCAL_HOST,
    check_display,
    console_session,
    listen,
    raw_terminal,
    serve_display,
)
from appliance.progress import Progress

EXIT_OK = 0
Params = Callable[[argparse.Namespace], dict[str, Any]]


@dataclass(frozen=True)
class Verb:
    """One verb that is one agent request: its method, its params from the parsed arguments, its printing."""

    noun: str
    name: str
    method: str
    help: str
    params: Params
    # Reads are retried once on a lost connection; changes are never sent twice.
    read_only: bool = False
    output: str = "table"  # or "fields", "console", "lines"
    # A verb that does more than its one request in some cases (guest console: the interactive attach).
    runner: Callable[[argparse.Namespace], int] | None = None


def by_name(args: argparse.Namespace) -> dict[str, Any]:
    return {"name": args.name}


def nothing(args: argparse.Namespace) -> dict[str, Any]:
    return {}


VERBS = (
    Verb("node", "report", "host.report", "the node's host report", nothing, read_only=True, output="fields"),
    Verb(
        "node",
        "logs",
        "node.logs",
        "the node's journal (this boot; --unit for one unit)",
        lambda args: {"lines": args.lines, "boot": args.boot, **({"unit": args.unit} if args.unit else {})},
        read_only=True,
        output="lines",
    ),
    Verb("node", "reboot", "node.reboot", "reboot the node (its guests are stopped by ACPI first)", nothing),
    Verb("node", "shutdown", "node.shutdown", "power the node off (its guests are stopped by ACPI first)", nothing),
    Verb("guest", "list", "guest.list", "every guest and its state", nothing, read_only=True),
    Verb(
        "guest", "info", "guest.info", "show a guest's details and definition", by_name, read_only=True, output="fields"
    ),
    Verb(
        "guest",
        "console",
        "guest.console",
        "show a guest's console: attached on a terminal (Ctrl-] leaves), its recent output with --log or in scripts",
        lambda args: {"name": args.name, "max_bytes": args.bytes},
        read_only=True,
        output="console",
        runner=lambda args: cmd_guest_console(args),
    ),
    Verb("guest", "start", "guest.start", "start a guest", by_name),
    Verb(
        "guest",
        "stop",
        "guest.stop",
        "stop a guest: ACPI power-down, forced off after --timeout",
        lambda args: {"name": args.name, "timeout": args.stop_timeout},
    ),
    Verb("guest", "kill", "guest.kill", "power a guest off at once, without a shutdown", by_name),
    Verb(
        "guest",
        "reboot",
        "guest.reboot",
        "reboot a guest: ACPI power-down and start (as virsh reboot); --hard: the reset button",
        lambda args: {"name": args.name, "mode": "reset" if args.hard else "acpi", "timeout": args.stop_timeout},
    ),
    Verb("guest", "pause", "guest.pause", "pause a guest's vCPUs (it keeps its memory)", by_name),
    Verb("guest", "resume", "guest.resume", "resume a paused guest", by_name),
    Verb(
        "guest",
        "delete",
        "guest.delete",
        "delete a guest (its disks are kept aside unless --remove-disks)",
        lambda args: {"name": args.name, "force": args.force, "remove_disks": args.remove_disks},
    ),
    Verb(
        "guest",
        "set-memory",
        "guest.set_memory",
        "change a running guest's memory through its balloon",
        lambda args: {"name": args.name, "memory_mib": args.mib},
    ),
    Verb(
        "guest",
        "set-cpu",
        "guest.set_cpu",
        "change a guest's CPU weight and quota (live under systemd)",
        lambda args: {
            "name": args.name,
            **({"cpu_weight": args.weight} if args.weight is not None else {}),
            **({"cpu_quota_percent": args.quota} if args.quota is not None else {}),
        },
    ),
    Verb(
        "guest disk",
        "add",
        "guest.disk_add",
        "add a blank disk (a running guest gets it at once where it can be hot-plugged)",
        lambda args: {"name": args.name, "size_gib": args.size},
        output="fields",
    ),
    Verb(
        "guest disk",
        "grow",
        "guest.disk_grow",
        "grow a disk (live when the guest runs; never smaller)",
        lambda args: {"name": args.name, "index": args.index, "size_gib": args.size},
        output="fields",
    ),
    Verb(
        "guest disk",
        "remove",
        "guest.disk_remove",
        "remove a stopped guest's disk (its file is kept aside: kept list)",
        lambda args: {"name": args.name, "index": args.index},
        output="fields",
    ),
    Verb(
        "image",
        "list",
        "image.list",
        "images on the node and their kind (disk, iso, kernel, initrd)",
        nothing,
        read_only=True,
    ),
    Verb("image", "delete", "image.delete", "delete an image no guest uses", by_name),
    Verb("kept", "list", "kept.list", "deleted guests' disks, kept aside", nothing, read_only=True),
    Verb(
        "kept",
        "restore",
        "kept.restore",
        "bring a deleted guest back with its disks and definition",
        lambda args: {"kept": args.kept, **({"name": args.as_name} if args.as_name else {})},
    ),
    Verb("kept", "purge", "kept.purge", "remove kept disks for good", lambda args: {"kept": args.kept}),
)

NOUNS = {
    "node": ("a node: its report, journal, reboot and power-off; disks and install (from the ISO)",
             "  appliance node report node1\n  appliance node logs node1 --unit ssh.service --lines 50\n"
             "  appliance node install node1 --disk /dev/sda"),
    "guest": ("guests on a node",
              "  appliance image push node1 debian-13.qcow2\n"
              "  appliance guest create node1 web --memory 1024 --disk image=debian-13.qcow2 --nic user \\\n"
              "      --hostname web --ssh-key ~/.ssh/id_ed25519.pub\n"
              "  appliance guest start node1 web\n  appliance guest console node1 web"),
    "image": ("the node's image store",
              "  appliance image push node1 debian.qcow2\n  appliance image list node1"),
    "kept": ("deleted guests' disks, kept aside: list, restore, purge",
             "  appliance kept list node1\n  appliance kept restore node1 web-20261125T101500"),
}  # fmt: skip


DISKS = (
    "a guest's disks: add, grow, remove",
    "  appliance guest disk add node1 web --size 20G\n  appliance guest disk grow node1 web 0 --size 40G\n"
    "  appliance guest disk remove node1 web 1",
)


def add_node_verbs(verbs: Verbs) -> None:
    subparsers: dict[str, Verbs] = {}
    for noun, (what, example) in NOUNS.items():
        parser = verbs.add_parser(noun, formatter_class=HelpFormatter, help=what, epilog=f"example:\n{example}")
        subparsers[noun] = parser.add_subparsers(dest=f"{noun}_verb", required=True, metavar="VERB")
    what, example = DISKS
    disk = subparsers["guest"].add_parser(
        "disk", formatter_class=HelpFormatter, help=what, epilog=f"example:\n{example}"
    )
    subparsers["guest disk"] = disk.add_subparsers(dest="disk_verb", required=True, metavar="VERB")
    for verb in VERBS:
        parser = subparsers[verb.noun].add_parser(verb.name, help=verb.help, description=verb.help)
        add_connection_options(parser)
        add_verb_arguments(verb, parser)
        parser.set_defaults(run=verb.runner or run_verb, verb_spec=verb)
    add_guest_definition_verbs(subparsers["guest"])
    add_display_verb(subparsers["guest"])
    add_migration_verbs(subparsers["guest"], subparsers["node"])
    push = subparsers["image"].add_parser("push", help="upload an image (the node checks its sha256)")
    add_connection_options(push)
    push.add_argument("file", type=Path)
    push.add_argument("--name", help="name in the store (default: the file name)")
    push.set_defaults(run=cmd_image_push)
    add_install_verbs(subparsers["node"])
    add_fleet_verbs(verbs)


def add_verb_arguments(verb: Verb, parser: argparse.ArgumentParser) -> None:
    """The arguments a table verb's params read."""
    key = f"{verb.noun} {verb.name}"
    if verb.noun in ("guest", "image", "guest disk") and verb.name != "list":
        parser.add_argument("name")
    if verb.noun == "kept" and verb.name != "list":
        parser.add_argument("kept", help="as kept list shows it")
    if key == "node logs":
        parser.add_argument("--unit", help="one systemd unit, e.g. ssh.service")
        parser.add_argument("--lines", type=int, default=200, help="default: %(default)s")
        parser.add_argument("--boot", type=int, default=0, help="0: this boot, -1: the one before, ...")
    elif key == "guest console":
        parser.add_argument(
            "--log", action="store_true", help="show the end of its output instead of attaching (as scripts get)"
        )
        parser.add_argument("--bytes", type=int, default=4096, help="with --log: how much (default: %(default)s)")
    elif key in ("guest disk grow", "guest disk remove"):
        parser.add_argument("index", type=int, help="the disk's place in the guest's disks (guest info), from 0")
        if key == "guest disk grow":
            parser.add_argument("--size", type=disk_size, required=True, help="its new size, e.g. 40G")
    elif key == "guest disk add":
        parser.add_argument("--size", type=disk_size, required=True, help="e.g. 20G (G or T; G if not said)")
    elif key in ("guest stop", "guest reboot"):
        parser.add_argument(
            "--timeout-stop",
            dest="stop_timeout",
            type=int,
            default=60,
            metavar="SECONDS",
            help="how long the guest may take to power down before it is forced off (default: %(default)s)",
        )
        if key == "guest reboot":
            parser.add_argument("--hard", action="store_true", help="reset at once, no shutdown")
    elif key == "guest delete":
        parser.add_argument("--force", action="store_true", help="kill it first if it is running")
        parser.add_argument("--remove-disks", action="store_true", help="remove its disks too")
    elif key == "guest set-memory":
        parser.add_argument("mib", type=int, metavar="MIB")
    elif key == "guest set-cpu":
        parser.add_argument("--weight", type=int, help="share against other guests, 1-10000 (default 100)")
        parser.add_argument("--quota", type=int, help="hard limit, percent of one CPU (0: none)")
    elif key == "kept restore":
        parser.add_argument("--as", dest="as_name", metavar="NAME", help="restore under another name")


def run_verb(args: argparse.Namespace) -> int:
    verb: Verb = args.verb_spec
    with node_connector(args)(parse_address(args.host)) as node:
        result = node.call(verb.method, verb.params(args), idempotent=verb.read_only)
    print_result(verb.output, result, args.json)
    return EXIT_OK


def print_result(output: str, result: Any, json_wanted: bool) -> None:
    if json_wanted:
        print(as_json(result))
    elif output == "console":
        print(result["text"], end="")
    elif output == "lines":
        print("\n".join(result["lines"]))
    elif output == "fields":
        print(format_fields(result))
    elif isinstance(result, list):
        print(format_table([people_row(row) for row in result]))
    else:
        print(format_table([result]))


def people_row(row: dict[str, Any]) -> dict[str, Any]:
    """A row as people read it: the name first (the agent sorts its keys), dates as dates (JSON keeps numbers)."""
    ordered = {"name": row["name"], **row} if "name" in row else row
    return {key: human_time(value) if key == "created" else value for key, value in ordered.items()}


def cmd_guest_console(args: argparse.Namespace) -> int:
    """Attached when both ends are a terminal (an operator at it), else the log (a script reading it)."""
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    if args.log or args.json or not interactive:
        return run_verb(args)
    with node_connector(args)(parse_address(args.host)) as node:
        attached = node.open_relay("guest.console_attach", {"name": args.name})
        with raw_terminal(sys.stdin.fileno()):
            # Said once the terminal is raw (a line break is \r\n now): what is typed after it reaches the guest.
            sys.stderr.write(f"Connected to guest {args.name}; escape character is {ESCAPE_NAME}\r\n")
            sys.stderr.flush()
            ended = console_session(attached, sys.stdin.fileno(), sys.stdout.fileno())
    print(f"\nthe console of {args.name} closed (the guest stopped)" if ended == "closed" else "", file=sys.stderr)
    return EXIT_OK


def add_display_verb(guest_verbs: Verbs) -> None:
    display = guest_verbs.add_parser(
        "display",
        formatter_class=HelpFormatter,
        help="a guest's graphical console (VNC), relayed to a port on 127.0.0.1 here",
        description="Listen on 127.0.0.1 here and relay each VNC viewer's connection to the guest's display\n"
        "through the SSH connection (nothing listens on the node; its sshd forwards nothing). The guest needs\n"
        "display = true in its definition (guest create/edit --display). Runs until Ctrl-C (or --once).",
        epilog="example:\n  appliance guest display node1 installer --port 5901 &\n  vncviewer 127.0.0.1::5901",
    )
    add_connection_options(display)
    display.add_argument("name")
    display.add_argument("--port", type=local_port, default=0, help="local port (default: a free one)")
    display.add_argument("--once", action="store_true", help="end when the first viewer disconnects")
    display.set_defaults(run=cmd_guest_display)


def cmd_guest_display(args: argparse.Namespace) -> int:
    with node_connector(args)(parse_address(args.host)) as node:
        check_display(node, args.name)
        server = listen(args.port)
        port = server.getsockname()[1]
        address = f"vnc://{LOCAL_HOST}:{port}"
        print(as_json({"name": args.name, "url": address, "port": port}) if args.json else address, flush=True)
        print(f"relaying the display of {args.name}; Ctrl-C to end", file=sys.stderr)
        try:
            serve_display(node, args.name, server, args.once, lambda text: print(text, file=sys.stderr))
        except KeyboardInterrupt:
            print("display relay ended", file=sys.stderr)
    return EXIT_OK


def add_guest_definition_verbs(guest_verbs: Verbs) -> None:
    create = guest_verbs.add_parser(
        "create",
        formatter_class=HelpFormatter,
        help="define a guest and make its disks",
        description="Define a guest from options, or from a definition file (--from, TOML or YAML, with\n"
        "guest.create's fields: memory_mib, vcpus, disks, nics, kernel_boot, cloud_init, ...) with options\n"
        "on top. A guest needs something to boot: a disk, a kernel, or a NIC (network boot).",
        epilog="example:\n"
        "  appliance guest create node1 web --memory 1024 --disk image=debian-13.qcow2 --disk size=20G \\\n"
        "      --nic bridge=br0,vlan=10 --hostname web --ssh-key ~/.ssh/id_ed25519.pub --autostart\n"
        "  appliance guest create node1 tiny --memory 128 --kernel vmlinuz --initrd initrd --cmdline console=ttyS0\n"
        "  appliance guest create node1 db --from db.toml",
    )
    add_connection_options(create)
    create.add_argument("name")
    add_definition_options(create, creating=True)
    create.set_defaults(run=cmd_guest_define, method="guest.create")
    edit = guest_verbs.add_parser(
        "edit",
        formatter_class=HelpFormatter,
        help="change a guest's definition (memory, vCPUs, NICs, cloud-init, ...; from its next start)",
        description="Change what can change: memory, vCPUs, autostart, restart policy, CPU limits, kernel boot,\n"
        "NICs and the cloud-init section (a new seed, with a new instance-id). Disks have their own verbs.",
        epilog="example:\n  appliance guest edit node1 web --memory 2048 --vcpus 2\n"
        "  appliance guest edit node1 web --from web.yaml",
    )
    add_connection_options(edit)
    edit.add_argument("name")
    add_definition_options(edit, creating=False)
    edit.set_defaults(run=cmd_guest_define, method="guest.update")


def add_definition_options(parser: argparse.ArgumentParser, creating: bool) -> None:
    parser.add_argument("--from", dest="from_file", type=Path, metavar="FILE", help="a definition file (TOML or YAML)")
    parser.add_argument("--memory", type=int, metavar="MIB")
    parser.add_argument("--vcpus", type=int)
    if creating:
        parser.add_argument(
            "--disk",
            action="append",
            default=[],
            metavar="SPEC",
            help="size=SIZE (a blank disk, e.g. 20G) or image=NAME (over a node image); repeatable",
        )
        parser.add_argument("--disk-size", type=int, metavar="GIB", help="one blank disk of this size")
        parser.add_argument("--base-image", metavar="IMAGE", help="one disk over an image on the node")
    parser.add_argument(
        "--nic",
        action="append",
        default=[],
        metavar="SPEC",
        help="bridge=BR[,vlan=ID][,mac=MAC][,model=virtio|e1000|rtl8139], or user[,...] for "
        "user-mode NAT (isolated from the node); repeatable",
    )
    parser.add_argument("--cdrom", metavar="IMAGE", help="an ISO of the node's store as a CD-ROM (edit: '' ejects)")
    parser.add_argument(
        "--boot",
        metavar="ORDER",
        help="boot order, e.g. cdrom,disk (of disk, cdrom, network, kernel; default: disks, then CD-ROM)",
    )
    parser.add_argument(
        "--display", action=argparse.BooleanOptionalAction, help="a graphical console (guest display), for installers"
    )
    parser.add_argument("--kernel", metavar="IMAGE", help="boot this kernel image from the node's store")
    parser.add_argument("--initrd", metavar="IMAGE", help="with --kernel: its initrd image")
    parser.add_argument("--cmdline", help="with --kernel: the kernel command line")
    parser.add_argument("--autostart", action=argparse.BooleanOptionalAction, help="start at node boot")
    parser.add_argument("--restart", choices=("never", "on-failure", "always"), help="when QEMU dies")
    parser.add_argument("--cpu-weight", type=int, help="share against other guests, 1-10000 (default 100)")
    parser.add_argument("--cpu-quota", type=int, metavar="PERCENT", help="hard limit, percent of one CPU")
    seed = parser.add_argument_group("cloud-init (a NoCloud seed the guest reads at boot)")
    seed.add_argument("--hostname")
    seed.add_argument(
        "--ssh-key",
        action="append",
        default=[],
        type=Path,
        metavar="PUBKEY_FILE",
        help="authorized keys for the guest's user; repeatable",
    )
    seed.add_argument("--user", help="the guest's user (default: the image's)")
    seed.add_argument("--user-data", type=Path, metavar="FILE", help="a #cloud-config document")
    seed.add_argument("--network-config", type=Path, metavar="FILE", help="network config v2 (YAML or JSON)")
    seed.add_argument("--vendor-data", type=Path, metavar="FILE")  # fmt: skip


def definition_options(args: argparse.Namespace) -> GuestOptions:
    disks = list(getattr(args, "disk", []))
    if getattr(args, "disk_size", None):
        disks.append(f"size={args.disk_size}G")
    if getattr(args, "base_image", None):
        disks.append(f"image={args.base_image}")
    return GuestOptions(
        memory_mib=args.memory, vcpus=args.vcpus, disks=tuple(disks), nics=tuple(args.nic),
        kernel=args.kernel, initrd=args.initrd, cmdline=args.cmdline, cdrom=args.cdrom, boot=args.boot,
        display=args.display, autostart=args.autostart,
        restart=args.restart, cpu_weight=args.cpu_weight, cpu_quota_percent=args.cpu_quota,
        hostname=args.hostname, ssh_key_files=tuple(args.ssh_key), user=args.user, user_data=args.user_data,
        network_config=args.network_config, vendor_data=args.vendor_data,
    )  # fmt: skip


def cmd_guest_define(args: argparse.Namespace) -> int:
    base = load_definition_file(args.from_file) if args.from_file else {}
    params = {**guest_params(base, definition_options(args)), "name": args.name}
    with node_connector(args)(parse_address(args.host)) as node:
        result = node.call(args.method, params)
    print_result("fields", result, args.json)
    return EXIT_OK


def cmd_image_push(args: argparse.Namespace) -> int:
    address = parse_address(args.host)
    name = args.name or args.file.name
    # Before connecting: a wrong file or name costs nothing.
    check_image_upload(args.file, name)
    with node_connector(args)(address) as node:
        node.check_push(args.file, name)
        progress = Progress(sys.stderr, interactive=sys.stderr.isatty())
        with progress.step(f"push {args.file}"):
            result = node.push_image(
                args.file, name,
                lambda sent, size: progress.detail(f"{sent * 100 // max(size, 1)}% of {size / 1e6:.1f} MB"),
                checked=True,
            )  # fmt: skip
    print_result("table", result, args.json)
    return EXIT_OK


def add_fleet_verbs(verbs: Verbs) -> None:
    fleet = verbs.add_parser(
        "fleet",
        formatter_class=HelpFormatter,
        help="ask many nodes at once",
        epilog="example:\n  appliance fleet report -i hosts.ini\n  appliance fleet guests -i hosts.yml --json",
    )
    fleet_verbs = fleet.add_subparsers(dest="fleet_verb", required=True, metavar="VERB")
    for verb, what in (("report", "every node's host report"), ("guests", "every node's guests")):
        parser = fleet_verbs.add_parser(verb, help=what)
        parser.add_argument(
            "-i", "--inventory", type=Path, required=True, help="Ansible INI or YAML inventory, or a host list"
        )
        parser.add_argument(
            "--concurrency", type=int, default=DEFAULT_CONCURRENCY, help="nodes at once (default: %(default)s)"
        )
        add_key_options(parser, timeout=30.0)
        parser.set_defaults(run=cmd_fleet)
    add_fleet_upgrade_verb(fleet_verbs)


def cmd_fleet(args: argparse.Namespace) -> int:
    entries = load_inventory(args.inventory)
    method = "host.report" if args.fleet_verb == "report" else "guest.list"
    outcomes = fan_out(entries, method, node_connector(args), args.concurrency)
    if args.json:
        print(as_json([vars(outcome) for outcome in outcomes]))
    else:
        print(format_table([fleet_row(outcome, method) for outcome in outcomes]))
    failed = [outcome for outcome in outcomes if not outcome.ok]
    print(f"{len(outcomes) - len(failed)} of {len(outcomes)} nodes answered", file=sys.stderr)
    for outcome in failed:
        print(f"appliance: {outcome.name}: {outcome.reason}", file=sys.stderr)
    return EXIT_FAILED if failed else EXIT_OK


def fleet_row(outcome: HostOutcome, method: str) -> dict[str, object]:
    if not outcome.ok:
        return {"host": outcome.name, "status": "FAILED", "detail": outcome.reason[:60]}
    if method == "guest.list":
        names = ", ".join(f"{guest['name']}({guest['state']})" for guest in outcome.result)
        return {"host": outcome.name, "status": "ok", "detail": names or "no guests"}
    report = outcome.result
    memory = f"{report['memory_available_bytes'] // 2**20}/{report['memory_total_bytes'] // 2**20} MiB free"
    return {"host": outcome.name, "status": "ok", "detail": f"{report['hostname']} {report['cpus']} CPUs {memory}"}

"""The `appliance` command: argument parsing and printing only."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from appliance import __version__
from appliance.boot.boot import DEFAULT_DISK_GIB, BootRequest, boot
from appliance.boot.selftest import SelftestError, SelftestOptions, selftest
from appliance.boot.vm import VmPaths, stop_recorded_vm
from appliance.build.dib import DEFAULT_CACHE_DIR
from appliance.build.pipeline import build, read_key_files
from appliance.deploy.flash import FlashError, flash
from appliance.deploy.pxe_server import CHAIN_SCRIPT, read_pxe_set, start_pxe_server
from appliance.errors import EXIT_FAILED, ApplianceError, UsageError
from appliance.nodes.client import Node, NodeAddress, check_image_upload, default_known_hosts, parse_address
from appliance.nodes.errors import AgentCallError
from appliance.nodes.fleet import DEFAULT_CONCURRENCY, HostOutcome, fan_out
from appliance.nodes.inventory import load_inventory
from appliance.nodes.keys import ENV_KEY, ENV_PASSPHRASE, Keyring
from appliance.nodes.upgrade import (
    DEFAULT_WAIT_SECONDS,
    GUEST_STOP_SECONDS,
    UpgradeOptions,
    load_build,
    upgrade_fleet,
    upgrade_node,
)
from appliance.progress import Progress
from appliance.spec import default_spec_text, load_spec

EXIT_OK, EXIT_INTERRUPTED = 0, 130
KEY_HELP = (
    f"operator private key (default: ${ENV_KEY}, else as ssh: the host's IdentityFile in ~/.ssh/config, "
    f"ssh-agent's keys, ~/.ssh/id_ed25519, id_ecdsa, id_rsa; a passphrase is asked on a terminal or read "
    f"from ${ENV_PASSPHRASE})"
)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    pass


class CommandLineError(UsageError):
    """What argparse refuses, raised rather than exiting, so `--json` can print it as JSON too."""

    def __init__(self, usage: str, message: str) -> None:
        super().__init__(message)
        self.usage = usage


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise CommandLineError(self.format_usage(), f"{self.prog}: error: {message}")


def whole_gib(text: str) -> int:
    """A disk size for argparse: a whole number of GiB, at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of GiB") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} GiB: a disk needs at least 1")
    return value


def tcp_port(text: str) -> int:
    """A TCP port for argparse: 1-65535."""
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port (1-65535)")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    # Typed as argparse's own: its subparsers are made of the same class, CommandLineError included.
    parser: argparse.ArgumentParser = ArgumentParser(
        prog="appliance",
        formatter_class=HelpFormatter,
        description="Build a minimal hypervisor appliance image (kernel, KVM, QEMU, agent) and boot it.",
        epilog="example:\n"
        "  appliance init appliance.toml\n"
        "  appliance build appliance.toml -o out --authorized-key ~/.ssh/id_ed25519.pub\n"
        "  appliance boot out --wait",
    )
    parser.add_argument("--version", action="version", version=f"appliance {__version__}")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    init = verbs.add_parser(
        "init",
        formatter_class=HelpFormatter,
        help="write a commented starter appliance.toml",
        epilog="example:\n  appliance init appliance.toml",
    )
    init.add_argument(
        "path", type=Path, nargs="?", default=Path("appliance.toml"), help="where to write it (default: %(default)s)"
    )
    init.add_argument("--force", action="store_true", help="overwrite an existing file")

    check = verbs.add_parser(
        "check",
        formatter_class=HelpFormatter,
        help="validate a spec without building",
        epilog="example:\n  appliance check appliance.toml",
    )
    check.add_argument("spec", type=Path, nargs="?", help="spec file (default: the built-in default spec)")

    build_cmd = verbs.add_parser(
        "build",
        formatter_class=HelpFormatter,
        help="build the appliance image into a directory",
        description="Build kernel, initrd, squashfs root and a hybrid ISO with diskimage-builder, plus manifest.json.\n"
        "Needs root (DIB uses chroots and loop devices); the full log goes to DIR/build.log.",
        epilog="example:\n  appliance build appliance.toml -o out --authorized-key ~/.ssh/id_ed25519.pub",
    )
    build_cmd.add_argument("spec", type=Path, nargs="?", help="spec file (default: the built-in default spec)")
    build_cmd.add_argument(
        "-o", "--output", type=Path, required=True, metavar="DIR", help="directory for the artifacts"
    )
    build_cmd.add_argument(
        "--authorized-key",
        type=Path,
        action="append",
        default=[],
        metavar="PUBKEY_FILE",
        help="add the operator public keys in this file to the spec's (repeatable)",
    )
    build_cmd.add_argument(
        "--cache-dir", type=Path, default=DEFAULT_CACHE_DIR, help="DIB image cache (default: %(default)s)"
    )

    boot_cmd = verbs.add_parser(
        "boot",
        formatter_class=HelpFormatter,
        help="boot a built appliance in QEMU",
        description="Boot DIR's ISO or disk image in QEMU (KVM when it really works here, else TCG),\n"
        "serial console to DIR/run/serial.log,\n"
        "SSH forwarded from a port on 127.0.0.1: --ssh-port, else the last boot's (DIR/run/ssh-port) while it is\n"
        "free, so known_hosts keeps one entry for the node; else any free one.\n"
        "Without --wait the console is shown until Ctrl-C.\n"
        "With --media disk the node's disk is DIR/run/disk.qcow2, copy-on-write over NAME.raw and kept\n"
        "from boot to boot (data and SSH host key survive) until the build changes or --fresh-disk;\n"
        "it names NAME.raw relative to itself, so a copy of DIR boots its own image.\n"
        "With --media pxe QEMU's own DHCP and TFTP hand the NIC's iPXE the chain script, and the PXE set\n"
        "is served over HTTP on 127.0.0.1 (as `appliance pxe serve` does) until the node is ready.",
        epilog="example:\n"
        "  appliance boot out --wait\n"
        "  appliance boot out --media disk --uefi --wait\n"
        "  appliance boot out --media pxe --wait\n"
        "  appliance stop out",
    )
    boot_cmd.add_argument("dir", type=Path, help="build directory (holds manifest.json)")
    boot_cmd.add_argument("--wait", action="store_true", help="return once the node is ready, leaving QEMU running")
    boot_cmd.add_argument(
        "--timeout", type=float, default=300.0, help="seconds to wait for ready (default: %(default)s)"
    )
    boot_cmd.add_argument(
        "--accel", choices=("auto", "kvm", "tcg"), default="auto", help="accelerator (default: %(default)s)"
    )
    boot_cmd.add_argument("--uefi", action="store_true", help="boot with UEFI firmware (OVMF) instead of SeaBIOS")
    boot_cmd.add_argument("--memory", type=int, default=2048, metavar="MB", help="guest memory (default: %(default)s)")
    boot_cmd.add_argument("--cpus", type=int, default=2, help="guest vCPUs (default: %(default)s)")
    boot_cmd.add_argument(
        "--media",
        choices=("iso", "disk", "pxe"),
        default="iso",
        help="boot the ISO, the disk image or the PXE set (default: %(default)s)",
    )
    boot_cmd.add_argument(
        "--disk-size",
        type=whole_gib,
        default=DEFAULT_DISK_GIB,
        metavar="GIB",
        help="size of a new disk; the node grows its data partition into it (default: %(default)s)",
    )
    boot_cmd.add_argument(
        "--extra-disk",
        type=whole_gib,
        default=0,
        metavar="GIB",
        help="attach a second disk, blank when made (DIR/run/extra-disk.qcow2, kept from boot to boot): "
        "a node built with [storage] claim_blank_disk = true keeps its state there",
    )
    boot_cmd.add_argument(
        "--ssh-port",
        type=tcp_port,
        metavar="PORT",
        help="port on 127.0.0.1 forwarded to the node's SSH (default: the last boot's while free, else any)",
    )
    boot_cmd.add_argument(
        "--seed",
        type=Path,
        metavar="FILE",
        help="attach FILE read-only as another disk: a cidata (NoCloud) or config-2 (ConfigDrive) volume "
        "the node takes its host name, keys and network from at boot",
    )
    boot_cmd.add_argument(
        "--fresh-disk",
        action="store_true",
        help="start from the image again, dropping the node's data (and empty the extra disk)",
    )

    add_node_verbs(verbs)
    add_fleet_verbs(verbs)
    add_image_verbs(verbs)
    add_pxe_verbs(verbs)
    add_lifecycle_verbs(verbs)

    selftest_cmd = verbs.add_parser(
        "selftest",
        formatter_class=HelpFormatter,
        help="check a build end to end: boot, SSH, a nested guest, agent restart, reboot",
        description="Boot DIR in QEMU and check it as an operator would, printing each step with its time:\n"
        "the host report over SSH, a tiny guest image pushed, an autostart guest created and started\n"
        "inside the node (its console marker seen), a new agent finding it still running; and from\n"
        "the disk image, a shutdown and boot finding the guest running again and the same host key.\n"
        "QEMU is stopped at the end, and the node's disk overlay in DIR/run is made anew.",
        epilog="example:\n  appliance selftest out --key ~/.ssh/id_ed25519",
    )
    selftest_cmd.add_argument("dir", type=Path, help="build directory (built with --authorized-key KEY.pub)")
    selftest_cmd.add_argument("--key", type=Path, help=KEY_HELP)
    selftest_cmd.add_argument(
        "--media",
        choices=("auto", "disk", "iso"),
        default="auto",
        help="boot the disk image (with the reboot check) or the ISO; auto: the disk if built (default)",
    )
    selftest_cmd.add_argument("--boot-timeout", type=float, default=900.0, help="seconds (default: %(default)s)")
    selftest_cmd.add_argument(
        "--guest-timeout", type=float, default=300.0, help="seconds for the nested guest (default: %(default)s)"
    )

    stop = verbs.add_parser(
        "stop",
        formatter_class=HelpFormatter,
        help="stop the QEMU started by `appliance boot --wait`",
        description="Stop the node booted from DIR. By default QEMU ends at once, like pulling the plug;\n"
        "--shutdown first presses the node's power button (ACPI) and waits for it to power off.",
        epilog="example:\n  appliance stop out\n  appliance stop out --shutdown 120",
    )
    stop.add_argument("dir", type=Path, help="build directory")
    stop.add_argument(
        "--shutdown",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="ask the node to shut down and wait this long before ending QEMU",
    )

    flash_cmd = verbs.add_parser(
        "flash",
        formatter_class=HelpFormatter,
        help="write the disk image to a disk or a file, then read it back to verify",
        description="Write DIR's NAME.raw to TARGET (a disk such as /dev/sdX, or a file), then read it back\n"
        "and compare its sha256 with the manifest's. A target that is mounted, used as swap, or holds the\n"
        "running system is refused. Asks before writing unless --yes; with no terminal to ask on, refuses.",
        epilog="example:\n  appliance flash out /dev/sdX\n  appliance flash out usb-stick.img --yes",
    )
    flash_cmd.add_argument("dir", type=Path, help="build directory (holds manifest.json and NAME.raw)")
    flash_cmd.add_argument("target", type=Path, help="disk device or file to write")
    flash_cmd.add_argument("--yes", action="store_true", help="do not ask before writing")
    return parser


def add_key_options(parser: argparse.ArgumentParser, timeout: float) -> None:
    """How to reach nodes: the operator key, host key checking, timeout, output."""
    parser.add_argument("--key", type=Path, help=KEY_HELP)
    parser.add_argument("--known-hosts", type=Path, default=default_known_hosts(), help="default: %(default)s")
    parser.add_argument("--strict", action="store_true", help="refuse hosts not yet in the known_hosts file")
    parser.add_argument(
        "--timeout",
        type=float,
        default=timeout,
        help="seconds for each step: TCP connect, SSH handshake, authentication, each request (default: %(default)s)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help='print the agent\'s answer as JSON; a failure as {"error": {"code": ..., "message": ...}}',
    )


def add_connection_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("host", metavar="HOST", help="[user@]host[:port] or an alias from ~/.ssh/config")
    add_key_options(parser, timeout=60.0)


def node_connector(args: argparse.Namespace) -> Callable[[NodeAddress], Node]:
    """Nodes reached with the operator's keys; an explicit key is checked (and its passphrase asked) once, now."""
    keyring = Keyring.for_operator(args.key)
    keyring.check()

    def connect(address: NodeAddress) -> Node:
        return Node(address, keyring, args.known_hosts, args.strict, args.timeout)

    return connect


GUEST_VERBS = {
    "start": "start a guest",
    "stop": "stop a guest: ACPI power-down, forced off if it does not go in time",
    "kill": "power a guest off at once, without a shutdown",
    "reboot": "reset a guest at once, like a reset button (no shutdown)",
    "pause": "pause a guest's vCPUs (it keeps its memory)",
    "resume": "resume a paused guest",
    "info": "show a guest's details",
    "console": "show a guest's console (its recent serial output)",
}


def add_node_verbs(verbs: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    node = verbs.add_parser(
        "node",
        formatter_class=HelpFormatter,
        help="ask a node's agent about the node",
        epilog="example:\n  appliance node report appliance@10.0.0.5",
    )
    node_verbs = node.add_subparsers(dest="node_verb", required=True, metavar="VERB")
    add_connection_options(node_verbs.add_parser("report", help="the node's host report"))
    add_install_verbs(node_verbs)

    guest = verbs.add_parser(
        "guest",
        formatter_class=HelpFormatter,
        help="manage guests on a node",
        epilog="example:\n  appliance guest create node1 web --memory 1024 --disk-size 10\n"
        "  appliance guest start node1 web\n  appliance guest list node1",
    )
    guest_verbs = guest.add_subparsers(dest="guest_verb", required=True, metavar="VERB")
    add_connection_options(guest_verbs.add_parser("list", help="every guest and its state"))
    for verb, what in GUEST_VERBS.items():
        parser = guest_verbs.add_parser(verb, help=what)
        add_connection_options(parser)
        parser.add_argument("name")
    delete = guest_verbs.add_parser("delete", help="delete a guest (its disks are kept aside unless --remove-disks)")
    add_connection_options(delete)
    delete.add_argument("name")
    delete.add_argument("--force", action="store_true", help="kill it first if it is running")
    delete.add_argument("--remove-disks", action="store_true", help="remove its disks too")
    create = guest_verbs.add_parser("create", help="define a guest and make its disk")
    add_connection_options(create)
    create.add_argument("name")
    create.add_argument("--memory", type=int, required=True, metavar="MIB")
    create.add_argument("--vcpus", type=int, default=1)
    disk = create.add_mutually_exclusive_group()
    disk.add_argument("--disk-size", type=int, metavar="GIB", help="a blank disk of this size")
    disk.add_argument("--base-image", metavar="IMAGE", help="a copy-on-write disk over an image on the node")
    create.add_argument("--autostart", action="store_true")


def add_image_verbs(verbs: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    image = verbs.add_parser(
        "image",
        formatter_class=HelpFormatter,
        help="the node's image store",
        epilog="example:\n  appliance image push node1 debian.qcow2\n  appliance image list node1",
    )
    image_verbs = image.add_subparsers(dest="image_verb", required=True, metavar="VERB")
    push = image_verbs.add_parser("push", help="upload an image (the node checks its sha256)")
    add_connection_options(push)
    push.add_argument("file", type=Path)
    push.add_argument("--name", help="name in the store (default: the file name)")
    add_connection_options(image_verbs.add_parser("list", help="images on the node"))
    delete = image_verbs.add_parser("delete", help="delete an image no guest uses")
    add_connection_options(delete)
    delete.add_argument("name")


def cmd_image(args: argparse.Namespace) -> int:
    address = parse_address(args.host)
    if args.image_verb == "push":
        # Before connecting: a wrong file or name costs nothing.
        check_image_upload(args.file, args.name or args.file.name)
    with node_connector(args)(address) as node:
        if args.image_verb == "push":
            name = args.name or args.file.name
            node.check_push(args.file, name)
            progress = Progress(sys.stderr, interactive=sys.stderr.isatty())
            with progress.step(f"push {args.file}"):
                result = node.push_image(
                    args.file, name,
                    lambda sent, size: progress.detail(f"{sent * 100 // max(size, 1)}% of {size / 1e6:.1f} MB"),
                    checked=True,
                )  # fmt: skip
        elif args.image_verb == "list":
            result = node.call("image.list", idempotent=True)
        else:
            result = node.call("image.delete", {"name": args.name})
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    elif args.image_verb == "list":
        print(format_table([image_row(image) for image in result]))
    else:
        print(format_table(result if isinstance(result, list) else [result]))
    return EXIT_OK


def image_row(image: dict[str, object]) -> dict[str, object]:
    """An image as people read the list: its name first, the date as a date."""
    return {"name": image.get("name"), "size_bytes": image.get("size_bytes"),
            "created": human_time(image.get("created")), "sha256": image.get("sha256")}  # fmt: skip


def human_time(epoch: object) -> str:
    """A timestamp as people read it, in local time (JSON keeps the number)."""
    if not isinstance(epoch, int | float):
        return str(epoch)
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


def add_fleet_verbs(verbs: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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
    add_fleet_upgrade_verb(fleet_verbs)


def cmd_fleet(args: argparse.Namespace) -> int:
    if args.fleet_verb == "upgrade":
        return cmd_fleet_upgrade(args)
    entries = load_inventory(args.inventory)
    method = "host.report" if args.fleet_verb == "report" else "guest.list"

    outcomes = fan_out(entries, method, node_connector(args), args.concurrency)
    if args.json:
        print(json.dumps([vars(outcome) for outcome in outcomes], indent=2, sort_keys=True))
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


def agent_request(args: argparse.Namespace) -> tuple[str, dict[str, object]]:
    """The agent method and params a node/guest verb stands for."""
    if args.verb == "node":
        return "host.report", {}
    if args.guest_verb == "list":
        return "guest.list", {}
    if args.guest_verb == "delete":
        return "guest.delete", {"name": args.name, "force": args.force, "remove_disks": args.remove_disks}
    if args.guest_verb == "create":
        params: dict[str, object] = {
            "name": args.name,
            "memory_mib": args.memory,
            "vcpus": args.vcpus,
            "autostart": args.autostart,
        }
        if args.disk_size:
            params["disks"] = [{"size_gib": args.disk_size}]
        elif args.base_image:
            params["disks"] = [{"base_image": args.base_image}]
        return "guest.create", params
    return f"guest.{args.guest_verb}", {"name": args.name}


def cmd_node(args: argparse.Namespace) -> int:
    if args.verb == "node" and args.node_verb in ("install", "disks"):
        return cmd_node_install(args)
    method, params = agent_request(args)
    with node_connector(args)(parse_address(args.host)) as node:
        result = node.call(method, params, idempotent=method in READ_ONLY_METHODS)
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    elif method == "guest.console":
        print(result["text"], end="")
    elif isinstance(result, list):
        print(format_table(result))
    else:
        print(format_table([result]) if method != "host.report" else format_fields(result))
    return EXIT_OK


READ_ONLY_METHODS = {"host.report", "guest.list", "guest.info", "guest.console"}


def format_fields(data: dict[str, object]) -> str:
    width = max((len(key) for key in data), default=0)
    return "\n".join(f"{key:<{width}}  {json.dumps(value) if isinstance(value, dict | list) else value}"
                     for key, value in sorted(data.items()))  # fmt: skip


def format_table(rows: list[dict[str, object]]) -> str:
    if not rows:
        return "(none)"
    columns = [key for key in rows[0] if not isinstance(rows[0][key], dict | list)]
    cells = [[str(row.get(column, "")) for column in columns] for row in rows]
    widths = [max(len(column), *(len(line[i]) for line in cells)) for i, column in enumerate(columns)]
    lines = ["  ".join(column.upper().ljust(width) for column, width in zip(columns, widths, strict=True))]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)) for line in cells]
    return "\n".join(lines)


def cmd_init(args: argparse.Namespace) -> int:
    if args.path.exists() and not args.force:
        print(f"appliance: {args.path} exists; use --force to overwrite", file=sys.stderr)
        return EXIT_FAILED
    args.path.write_text(default_spec_text())
    print(f"wrote {args.path}; edit it, then: appliance build {args.path} -o out")
    return EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec)
    print(f"{args.spec or 'default spec'}: ok ({spec.name}, {spec.release}, sha256 {spec.digest()[:12]})")
    return EXIT_OK


def cmd_build(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec).with_extra_keys(read_key_files(args.authorized_key))
    if not spec.ssh.authorized_keys:
        print(
            "appliance: warning: no operator SSH keys; nobody will be able to log in (use --authorized-key)",
            file=sys.stderr,
        )
    progress = Progress(sys.stdout, interactive=sys.stdout.isatty())
    result = build(spec, args.output, progress, cache_dir=args.cache_dir)
    print(f"built in {result.seconds:.0f}s:")
    for path in result.artifacts:
        print(f"  {path}  {path.stat().st_size / 1e6:.1f} MB")
    print(f"  {result.manifest_path}")
    return EXIT_OK


def cmd_boot(args: argparse.Namespace) -> int:
    request = BootRequest(
        out_dir=args.dir,
        wait=args.wait,
        timeout=args.timeout,
        accel=args.accel,
        firmware="uefi" if args.uefi else "bios",
        memory_mb=args.memory,
        cpus=args.cpus,
        media=args.media,
        disk_gib=args.disk_size,
        fresh_disk=args.fresh_disk,
        extra_disk_gib=args.extra_disk,
        ssh_port=args.ssh_port,
        seed=args.seed,
    )
    result = boot(request)
    if args.wait:
        print(f"ready after {result.seconds_to_ready:.1f}s ({result.accel.accel})")
        print(f"  console log:      {result.paths.console_log}")
        print(f"  stop it:          appliance stop {args.dir}")
    return EXIT_OK


def add_pxe_verbs(verbs: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    pxe = verbs.add_parser(
        "pxe",
        formatter_class=HelpFormatter,
        help="network boot: serve a build's PXE set over HTTP",
        description="Serve DIR's PXE set (NAME.ipxe, kernel, initrd, squashfs) over HTTP until Ctrl-C.\n"
        "DHCP and TFTP stay with your own infrastructure: point them (or an iPXE prompt) at boot.ipxe,\n"
        "which sets base-url to this server and chains NAME.ipxe. The same boot.ipxe is written to\n"
        "DIR/run/pxe/ for a TFTP server to hand out.",
        epilog="example:\n  appliance pxe serve out --http-port 8080\n"
        "  # at an iPXE prompt, or in your DHCP server's iPXE script:\n"
        "  chain http://BOOT-SERVER:8080/boot.ipxe",
    )
    pxe_verbs = pxe.add_subparsers(dest="pxe_verb", required=True, metavar="VERB")
    serve = pxe_verbs.add_parser("serve", help="serve the PXE set until Ctrl-C")
    serve.add_argument("dir", type=Path, help="build directory (holds manifest.json and NAME.ipxe)")
    serve.add_argument("--http-port", type=int, default=8080, help="0 picks a free port (default: %(default)s)")
    serve.add_argument("--bind", default="0.0.0.0", help="address to listen on (default: %(default)s)")
    serve.add_argument(
        "--base-url", help="URL the servers being booted reach this one by (default: http://ADDRESS:PORT/)"
    )


def cmd_pxe(args: argparse.Namespace) -> int:
    pxe = read_pxe_set(args.dir)
    server = start_pxe_server(pxe, args.bind, args.http_port, args.base_url, lambda line: print(line, flush=True))
    print(f"serving {', '.join(pxe.files)} from {args.dir}", flush=True)
    print(f"boot URL: {server.base_url}{CHAIN_SCRIPT}  (iPXE: chain {server.base_url}{CHAIN_SCRIPT})", flush=True)
    print(f"for TFTP: {server.chain_file}", flush=True)
    try:
        server.thread.join()
    finally:
        server.close()
    return EXIT_OK


def cmd_selftest(args: argparse.Namespace) -> int:
    options = SelftestOptions(
        out_dir=args.dir,
        key=args.key,
        media=args.media,
        boot_timeout=args.boot_timeout,
        guest_timeout=args.guest_timeout,
    )
    try:
        report = selftest(options, sys.stdout)
    except SelftestError as error:
        print(f"appliance: selftest failed: {error}", file=sys.stderr)
        return EXIT_FAILED
    total = sum(seconds for _, seconds in report.steps)
    print(f"selftest passed: {len(report.steps)} steps in {total:.0f}s")
    return EXIT_OK


def cmd_stop(args: argparse.Namespace) -> int:
    if stop_recorded_vm(VmPaths(args.dir / "run"), args.shutdown):
        print(f"stopped the appliance running from {args.dir}")
    else:
        print(f"no appliance running from {args.dir}")
    return EXIT_OK


def cmd_flash(args: argparse.Namespace) -> int:
    def confirm(question: str) -> bool:
        if args.yes:
            return True
        if not sys.stdin.isatty():
            raise FlashError(f"refusing to write {args.target} without --yes: there is no terminal to ask on")
        return input(f"{question} Type yes: ").strip() == "yes"

    progress = Progress(sys.stderr, interactive=sys.stderr.isatty())
    with progress.step(f"write {args.dir} to {args.target}"):
        result = flash(
            args.dir,
            args.target,
            confirm,
            lambda done, size: progress.detail(f"{done * 100 // max(size, 1)}% of {size / 1e6:.0f} MB"),
        )
    print(f"wrote {result.image.name} to {result.target} ({result.size_bytes / 1e6:.0f} MB in {result.seconds:.0f}s)")
    print(f"  read back: sha256 {result.sha256} matches the manifest")
    return EXIT_OK


# --- The node's own life: install from the ISO, upgrade, roll back (appliance.nodes.upgrade) ---


def add_install_verbs(node_verbs: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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
    add_connection_options(node_verbs.add_parser("disks", help="the node's disks, and which an install would take"))


def add_lifecycle_verbs(verbs: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    upgrade = verbs.add_parser(
        "upgrade",
        formatter_class=HelpFormatter,
        help="send a new build into the root slot a node does not run, and try it",
        description="Check DIR (a build of the node's spec, for its architecture, that fits its slot), send\n"
        "its kernel, initrd and squashfs into the slot the node does not run (each file's sha256\n"
        "checked against the manifest by the node), and arm one trial boot of it. The build the node\n"
        "runs is a no-op; a cut-off upgrade run again sends only what is missing. Refused while\n"
        "guests run unless --stop-guests. On the trial boot the node checks its health ([upgrade] in\n"
        "the spec) and makes the new build the default, or goes back to the old one by itself.",
        epilog="example:\n  appliance upgrade node1 out --reboot --wait\n  appliance rollback node1 --reboot",
    )
    add_connection_options(upgrade)
    upgrade.add_argument("dir", type=Path, help="build directory (holds manifest.json)")
    add_upgrade_options(upgrade)
    upgrade.set_defaults(timeout=300.0)
    rollback = verbs.add_parser(
        "rollback",
        formatter_class=HelpFormatter,
        help="make the build a node ran before the default again",
        epilog="example:\n  appliance rollback node1 --reboot",
    )
    add_connection_options(rollback)
    rollback.add_argument("--reboot", action="store_true", help="reboot into it now")


def add_upgrade_options(parser: argparse.ArgumentParser, always_reboots: bool = False) -> None:
    parser.add_argument(
        "--stop-guests", action="store_true", help="stop running guests (ACPI) once the slot is written"
    )
    parser.add_argument(
        "--stop-timeout", type=int, default=GUEST_STOP_SECONDS, metavar="SECONDS",
        help="with --stop-guests: force a guest off after this long (default: %(default)s)",
    )  # fmt: skip
    if not always_reboots:
        parser.add_argument("--reboot", action="store_true", help="reboot into the trial (else it waits for a reboot)")
        parser.add_argument("--wait", action="store_true", help="with --reboot: wait until the node judged the trial")
    parser.add_argument(
        "--wait-timeout", type=float, default=DEFAULT_WAIT_SECONDS, metavar="SECONDS",
        help="how long to wait for the verdict (default: %(default)s)",
    )  # fmt: skip


def add_fleet_upgrade_verb(fleet_verbs: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = fleet_verbs.add_parser(
        "upgrade",
        help="upgrade nodes in waves, each rebooted and waited for; stops at the first that rolls back",
    )
    parser.add_argument(
        "-i", "--inventory", type=Path, required=True, help="Ansible INI or YAML inventory, or a host list"
    )
    parser.add_argument("dir", type=Path, help="build directory (holds manifest.json)")
    parser.add_argument("--max-parallel", type=int, default=1, help="nodes per wave (default: %(default)s)")
    add_upgrade_options(parser, always_reboots=True)
    add_key_options(parser, timeout=300.0)


def step_printer() -> tuple[Progress, Callable[[str], None]]:
    progress = Progress(sys.stderr, interactive=sys.stderr.isatty())
    return progress, lambda line: progress.note(line)


def cmd_node_install(args: argparse.Namespace) -> int:
    with node_connector(args)(parse_address(args.host)) as node:
        if args.node_verb == "disks":
            result = node.call("node.disks", idempotent=True)
        else:
            progress, say = step_printer()
            with progress.step(f"install {args.host} onto {args.disk}"):
                result = node.call("node.install", {"disk": args.disk, "wipe": args.wipe},
                                   on_progress=lambda params: say(str(params.get("text", ""))))  # fmt: skip
            if args.reboot:
                node.call("node.reboot")
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    elif args.node_verb == "disks":
        print(format_table([{**disk, "in_use": "; ".join(disk["in_use"])} for disk in result]))
    else:
        print(f"installed {result['build_id']} on {result['disk']} in {result['seconds']:.0f}s"
              + ("; rebooting" if args.reboot else "; remove the ISO and reboot to run from the disk"))  # fmt: skip
    return EXIT_OK


def cmd_upgrade(args: argparse.Namespace) -> int:
    build = load_build(args.dir)
    progress, say = step_printer()

    def sent(name: str, done: int, size: int) -> None:
        progress.detail(f"{name}: {done * 100 // max(size, 1)}% of {size / 1e6:.1f} MB")

    with progress.step(f"upgrade {args.host} to {build.manifest.build_id}"):
        options = UpgradeOptions(
            args.stop_guests, args.stop_timeout, args.reboot, args.wait_timeout if args.wait else 0.0
        )
        outcome = upgrade_node(node_connector(args), parse_address(args.host), build, options, say, sent)
    if args.json:
        print(json.dumps(vars(outcome), indent=2, sort_keys=True))
    elif outcome.noop:
        print(f"{args.host}: nothing to do: {outcome.reason}")
    else:
        figures = ", ".join(f"{key} {value:.1f}s" for key, value in outcome.seconds.items())
        print(f"{args.host}: {build.manifest.build_id} in slot {outcome.slot} ({outcome.sent_bytes / 1e6:.1f} MB sent; "
              f"{figures})")  # fmt: skip
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
        print(json.dumps(result, indent=2, sort_keys=True))
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
        print(json.dumps([vars(outcome) for outcome in outcomes], indent=2, sort_keys=True))
    else:
        print(format_table([{"host": o.name, "status": o.status, "detail": o.detail[:80]} for o in outcomes]))
    return EXIT_OK if all(outcome.ok for outcome in outcomes) else EXIT_FAILED


COMMANDS = {
    "init": cmd_init,
    "check": cmd_check,
    "build": cmd_build,
    "boot": cmd_boot,
    "stop": cmd_stop,
    "flash": cmd_flash,
    "node": cmd_node,
    "guest": cmd_node,
    "fleet": cmd_fleet,
    "image": cmd_image,
    "pxe": cmd_pxe,
    "selftest": cmd_selftest,
    "upgrade": cmd_upgrade,
    "rollback": cmd_rollback,
}


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
        return COMMANDS[args.verb](args)
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


def error_json(error: ApplianceError) -> str:
    """A failure for scripts: the agent's stable code and message when the agent answered, else the client's."""
    body: dict[str, Any] = {"code": error.code, "message": str(error)}
    if isinstance(error, AgentCallError):
        body["message"] = error.message
        if error.details:
            body["details"] = error.details
    return json.dumps({"error": body}, sort_keys=True)


if __name__ == "__main__":
    sys.exit(main())

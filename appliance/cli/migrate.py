"""`guest migrate SRC NAME DST` and `node evacuate SRC --to DST`: parsing, progress and printing only
(the work is appliance.nodes.migrate's)."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any

from appliance.cli.output import as_json, format_fields, format_table
from appliance.cli.parsing import HelpFormatter, Verbs, add_key_options, node_connector
from appliance.errors import EXIT_FAILED, UsageError
from appliance.nodes.client import Node, NodeAddress, parse_address
from appliance.nodes.migrate import Endpoint, MigrationOptions, evacuate, migrate_guest
from appliance.progress import Progress

EXIT_OK = 0
MIB = 1 << 20

MIGRATE_HELP = """\
Move a guest to another node. A running guest keeps running while its disks are mirrored and its memory
is copied (QEMU's live migration), then continues on DST from where it was; a stopped guest's disks and
definition are copied. Its definition (autostart, restart policy, limits, NICs with their MACs,
cloud-init) goes with it, and images it uses that DST lacks are copied first. The nodes never connect to
each other: every byte goes through this machine's SSH connections to both. DST checks first that it can
take the guest (its images, policy, bridges, accelerator and QEMU); nothing moves if it refuses. SRC's
guest is removed only once DST has taken it; on any failure it runs on at SRC."""


def add_migration_verbs(guest_verbs: Verbs, node_verbs: Verbs) -> None:
    migrate = guest_verbs.add_parser(
        "migrate",
        formatter_class=HelpFormatter,
        help="move a guest to another node (live when it runs)",
        description=MIGRATE_HELP,
        epilog="example:\n  appliance guest migrate node1 web node2\n"
        "  appliance guest migrate node1 db node2 --bandwidth 200",
    )
    migrate.add_argument("host", metavar="SRC", help="the node the guest is on ([user@]host[:port] or an alias)")
    migrate.add_argument("name")
    migrate.add_argument("destination", metavar="DST", help="the node to move it to")
    add_migration_options(migrate)
    migrate.set_defaults(run=cmd_guest_migrate)
    evacuate_parser = node_verbs.add_parser(
        "evacuate",
        formatter_class=HelpFormatter,
        help="move every guest of a node to another (before an upgrade or a repair)",
        description="Move every guest of SRC to DST, one at a time, as `guest migrate` does; one that cannot\n"
        "move stays on SRC (and is named) and the others go on.",
        epilog="example:\n  appliance node evacuate node1 --to node2",
    )
    evacuate_parser.add_argument("host", metavar="SRC")
    evacuate_parser.add_argument("--to", dest="destination", metavar="DST", required=True)
    add_migration_options(evacuate_parser)
    evacuate_parser.set_defaults(run=cmd_node_evacuate)


def add_migration_options(parser: argparse.ArgumentParser) -> None:
    add_key_options(parser, timeout=60.0)
    parser.add_argument(
        "--bandwidth",
        type=int,
        default=0,
        metavar="MIB",
        help="at most this many MiB/s for the memory and for each disk (default: QEMU's own limit)",
    )
    parser.add_argument(
        "--direct",
        action="store_true",
        help="send a running guest's memory and disks straight from SRC to DST over TCP with TLS (credentials "
        "made for this migration alone), instead of through this machine: for nodes that reach each other; "
        "DST listens on two TCP ports while it lasts",
    )
    parser.add_argument(
        "--direct-address",
        metavar="ADDRESS",
        help="with --direct: the address SRC reaches DST at (default: DST's host as this machine reaches it)",
    )


def options(args: argparse.Namespace) -> MigrationOptions:
    if args.direct_address and not args.direct:
        raise UsageError("--direct-address goes with --direct")
    address = (args.direct_address or parse_address(args.destination).host) if args.direct else ""
    return MigrationOptions(args.bandwidth, address)


@contextlib.contextmanager
def endpoints(args: argparse.Namespace) -> Iterator[tuple[Endpoint, Endpoint]]:
    """SRC and DST connected (each closed at the end, whichever connection it has by then)."""
    connect = node_connector(args)
    with contextlib.ExitStack() as stack:
        pair = []
        for text in (args.host, args.destination):
            address = parse_address(text)
            node = connect(address)
            node.connect()
            endpoint = Endpoint(node, reconnect(connect, address), text)
            stack.callback(endpoint.close)
            pair.append(endpoint)
        yield pair[0], pair[1]


def reconnect(connect: Callable[[NodeAddress], Node], address: NodeAddress) -> Callable[[], Node]:
    def again() -> Node:
        node = connect(address)
        node.connect()
        return node

    return again


def cmd_guest_migrate(args: argparse.Namespace) -> int:
    progress = Progress(sys.stderr, interactive=sys.stderr.isatty())
    chosen = options(args)
    step = f"migrate {args.name} from {args.host} to {args.destination}"
    with endpoints(args) as (source, destination), progress.step(step):
        result = migrate_guest(source, destination, args.name, chosen, lambda said: progress.detail(line(said)))
    print(as_json(result) if args.json else format_fields(result))
    return EXIT_OK


def cmd_node_evacuate(args: argparse.Namespace) -> int:
    progress = Progress(sys.stderr, interactive=sys.stderr.isatty())
    chosen = options(args)
    with endpoints(args) as (source, destination), progress.step(f"evacuate {args.host} to {args.destination}"):
        outcomes = evacuate(source, destination, chosen, lambda said: progress.detail(line(said)))
    if args.json:
        print(as_json(outcomes))
    else:
        print(format_table([row(outcome) for outcome in outcomes]))
    failed = [outcome for outcome in outcomes if not outcome["ok"]]
    for outcome in failed:
        print(f"appliance: {outcome['name']}: {outcome['reason']}", file=sys.stderr)
    return EXIT_FAILED if failed else EXIT_OK


def row(outcome: dict[str, Any]) -> dict[str, Any]:
    if not outcome["ok"]:
        return {"name": outcome["name"], "moved": "no", "detail": str(outcome["reason"])[:70]}
    downtime = f", downtime {outcome['downtime_ms']} ms" if outcome.get("downtime_ms") is not None else ""
    how = "live" if outcome["live"] else "stopped"
    return {"name": outcome["name"], "moved": "yes", "detail": f"{how}, {outcome['seconds']:.1f}s{downtime}"}


def line(said: dict[str, Any]) -> str:
    """A progress report as one line for the terminal."""
    phase = said["phase"]
    if phase in ("image", "file"):
        what = said.get("image") or said.get("file")
        return f"copying {phase} {what}: {percent(said['sent'], said['size'])} of {said['size'] / MIB:.0f} MiB"
    if phase == "guest":
        return f"guest {said['name']}"
    if phase == "disks":
        copied = sum(disk["copied"] for disk in said["disks"])
        total = sum(disk["total"] for disk in said["disks"])
        return f"mirroring disks: {percent(copied, total)} of {total / MIB:.0f} MiB"
    memory = said["memory"]
    if phase == "memory":
        expected = said.get("expected_downtime_ms")
        return (
            f"memory: {memory['transferred'] / MIB:.0f} MiB sent, {memory['remaining'] / MIB:.0f} MiB to go, "
            f"dirtied {memory['dirty_bytes_per_second'] / MIB:.1f} MiB/s"
            + (f", expected downtime {expected} ms" if expected is not None else "")
        )
    if phase == "switch-over":
        return "switching over to the destination"
    return f"completed: {memory['transferred'] / MIB:.0f} MiB of memory, downtime {said.get('downtime_ms')} ms"


def percent(part: int, whole: int) -> str:
    return f"{100 * part // whole}%" if whole else "100%"

"""Command line of the node agent.

`appliance-agent serve|report|ready|autostart|powerdown-guest|tap-helper|launch-guest`, and as root at boot
`lifecycle-boot|firstboot|install`, and per connection `lifecycle-helper`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from appliance.agent import lifecycle
from appliance.agent.accel import AccelChoice, node_accel
from appliance.agent.config import DEFAULT_CONFIG_PATH, AgentConfig, ConfigError, load_config
from appliance.agent.host import collect_report

# Each verb imports what it runs, no more: `ready` runs at boot, where every module
# imported costs time on a slow (emulated) CPU, and it needs neither the server nor
# the guests.


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="appliance-agent",
        description="The appliance node agent.",
        epilog="example: appliance-agent report",
    )
    parser.add_argument(
        "--config", type=Path, default=DEFAULT_CONFIG_PATH, help="agent config file (default: %(default)s)"
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        help="where guests and images are kept (default: from the config, or $APPLIANCE_STATE_DIR)",
    )
    verbs = parser.add_subparsers(dest="verb", required=True)
    verbs.add_parser("serve", help="answer JSON-RPC requests on stdin/stdout, one per line (what SSH runs)")
    verbs.add_parser("report", help="print a JSON report of this host")
    ready = verbs.add_parser("ready", help="print the one-line ready marker (at boot, on the console)")
    ready.add_argument("--console", type=Path, help="write the marker to this device instead of stdout")
    verbs.add_parser("autostart", help="start every guest marked autostart (at boot)")
    powerdown = verbs.add_parser(
        "powerdown-guest", help="ask a guest to power down and wait (the ExecStop of a guest's systemd unit)"
    )
    powerdown.add_argument("name")
    verbs.add_parser(
        "tap-helper",
        help="as root: make one guest tap on an allowed bridge and pass it back over the socket on stdin "
        "(run by appliance-tap-helper.socket)",
    )
    launcher = verbs.add_parser(
        "launch-guest", help="make a guest's NIC descriptors (taps, passt), then exec QEMU (the guest's command)"
    )
    launcher.add_argument("plan", help="what to make, as JSON (written by the agent)")
    launcher.add_argument("qemu", nargs=argparse.REMAINDER, help="-- and QEMU's command line")
    lifecycle.add_verbs(verbs)
    return parser


def own_command(config: Path, state_dir: Path) -> tuple[str, ...]:
    """How a guest unit's ExecStop runs this agent again, with the same config and state."""
    program = Path(sys.argv[0])
    start = (
        (str(program.resolve()),) if program.name == "appliance-agent" else (sys.executable, "-m", "appliance.agent")
    )
    return (*start, "--config", str(config.resolve()), "--state-dir", str(state_dir.resolve()))


ACCEL_CACHE_NAME = "accel-probe.json"


def ready_line(marker: str, build_info_path: Path, accel: AccelChoice) -> str:
    report = collect_report(build_info_path)
    return f"{marker} host={report.hostname} build={report.build_id} kernel={report.kernel} accel={accel.accel}"


def run_hypervisor(args: argparse.Namespace, config: AgentConfig, state_dir: Path, accel: AccelChoice) -> int:
    """serve, autostart and powerdown-guest: the verbs that work on guests."""
    from appliance.agent.guests import Hypervisor, powerdown_guest, start_autostart_guests
    from appliance.agent.server import ServerContext, serve
    from appliance.agent.supervisors import ProcessSupervisor, Supervisor, SystemdSupervisor
    from appliance.agent.units import find_user_manager

    manager = find_user_manager()
    supervisor: Supervisor = (
        SystemdSupervisor(manager, own_command(args.config, state_dir)) if manager else ProcessSupervisor()
    )
    hypervisor = Hypervisor(
        state_dir=state_dir,
        accel=accel,
        policy=config.policy,
        supervisor=supervisor,
        network=config.network,
        agent_command=own_command(args.config, state_dir),
    )
    context = ServerContext(hypervisor, config.build_info_path)
    if args.verb == "serve":
        serve(context, sys.stdin.buffer, sys.stdout.buffer)
    elif args.verb == "autostart":
        results = start_autostart_guests(context.host, context.store)
        print(json.dumps(results))
        return 1 if any("error" in result for result in results) else 0
    else:
        print(powerdown_guest(context.host, args.name))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as error:
        print(f"appliance-agent: {error}", file=sys.stderr)
        return 1
    state_dir = args.state_dir or Path(os.environ.get("APPLIANCE_STATE_DIR") or config.state_dir)
    if args.verb == "report":
        print(json.dumps(collect_report(config.build_info_path).to_json(), indent=2, sort_keys=True))
        return 0
    if args.verb == "tap-helper":
        from appliance.agent import taps

        return taps.main(config.network)
    if args.verb == "launch-guest":
        from appliance.agent import launch

        return launch.main(args.plan, args.qemu)
    if args.verb in lifecycle.VERBS:
        return lifecycle.main(args)
    accel = node_accel(os.environ.get("APPLIANCE_ACCEL") or config.accel, state_dir / ACCEL_CACHE_NAME)
    if args.verb in ("serve", "autostart", "powerdown-guest"):
        return run_hypervisor(args, config, state_dir, accel)
    line = ready_line(config.ready_marker, config.build_info_path, accel)
    if args.console is None:
        print(line)
    else:
        with open(args.console, "w") as console:
            console.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

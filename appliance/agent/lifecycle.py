"""The agent's root verbs for the node's own life, run by systemd units of appliance-lifecycle.

lifecycle-helper  one request from the agent, on the socket systemd passes as stdin
lifecycle-boot    at boot: judge a trial boot (bless its slot, or reboot to the default) and record the slots
firstboot         at boot: take the provisioner's configuration (NoCloud, ConfigDrive)
install           write the running build onto a disk (the ISO's unattended menu entry)
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from contextlib import suppress
from pathlib import Path

from appliance.agent.lifecycle_config import LifecycleConfigError, load_lifecycle_config

VERBS = ("lifecycle-helper", "lifecycle-boot", "firstboot", "install")
CONSOLE = Path("/dev/console")


def add_verbs(verbs: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    verbs.add_parser(
        "lifecycle-helper",
        help="as root: one install/upgrade request from the agent on the socket on stdin "
        "(run by appliance-lifecycle-helper.socket)",
    )
    verbs.add_parser(
        "lifecycle-boot", help="as root at boot: judge a trial boot (bless its slot or roll back), record the slots"
    )
    first = verbs.add_parser(
        "firstboot", help="as root at boot: take host name, keys and network from a NoCloud or ConfigDrive source"
    )
    first.add_argument(
        "--network", action="store_true", help="the late pass, once the network is up: a ds=nocloud;s=URL source"
    )
    setup = verbs.add_parser("install", help="as root: write the running build onto a disk, from the ISO")
    setup.add_argument("--disk", default="first-blank", help="a whole disk, or first-blank (default)")
    setup.add_argument("--wipe", action="store_true", help="erase a disk that has partitions or signatures")
    setup.add_argument("--reboot", action="store_true", help="reboot once installed")


def say(text: str) -> None:
    """A line for the operator at the console, and for the journal."""
    print(text, file=sys.stderr, flush=True)
    with suppress(OSError), CONSOLE.open("w") as console:
        console.write(f"appliance: {text}\n")


def reboot() -> None:
    subprocess.run(["systemctl", "--no-block", "reboot"], check=False)


def main(args: argparse.Namespace) -> int:
    # Each verb imports its own modules only: two of them run on the way to ready at every boot,
    # where each import is paid in CPU under emulation.
    try:
        config = load_lifecycle_config()
    except LifecycleConfigError as error:
        say(str(error))
        return 1
    if args.verb == "lifecycle-helper":
        from appliance.agent import lifecycle_helper

        return lifecycle_helper.main(config)
    if args.verb == "lifecycle-boot":
        from appliance.agent import trial

        outcome = trial.boot_check(config, say, reboot)
        return 0 if outcome != "rolled-back" else 1
    if args.verb == "firstboot":
        from appliance.agent import firstboot

        return firstboot.main(config, say, late=args.network)
    from appliance.agent import install
    from appliance.agent.errors import AgentError

    try:
        disk = install.first_blank_disk() if args.disk == "first-blank" else args.disk
        done = install.install(config, disk, args.wipe, lambda text: say(f"install: {text}"))
    except AgentError as error:
        say(f"install: {error.message}")
        return 1
    say(f"install: done on {done['disk']} in {done['seconds']:.0f}s; remove the install medium to boot from the disk")
    if args.reboot:
        reboot()
    return 0

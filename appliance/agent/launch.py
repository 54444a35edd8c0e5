"""`appliance-agent launch-guest PLAN -- QEMU...`: make a guest's NIC descriptors, then become QEMU.

Run wherever QEMU would be (by the agent, or as a systemd unit's ExecStart,
so a restart after a crash makes them again): for each bridged NIC it asks
the root tap helper for an open tap on the bridge, for each user-mode NIC it
starts passt on one end of a socket pair, puts each descriptor at the number
QEMU's command line names, and execs QEMU. It holds nothing after that: QEMU
is the only holder of every tap, so a tap goes when QEMU goes.

A guest arriving by migration starts here too: its first start waits for
the migration (-incoming defer, paused), any later one boots it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

from appliance.agent.nics import PASST, LaunchPlan, PasstRequest, TapRequest

REPLY_LIMIT = 4096
# Far above the numbers QEMU is told to use, so moving a descriptor into place never overwrites another.
STAGING_FD = 100


class LaunchError(Exception):
    """A NIC could not be made; the guest does not start."""


def request_tap(socket_path: str, tap: TapRequest) -> int:
    """An open tap on the bridge, from the tap helper; its descriptor is ours to pass on."""
    request = {"ifname": tap.ifname, "bridge": tap.bridge, "vlan": tap.vlan, "mac": tap.mac}
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
        try:
            connection.connect(socket_path)
        except OSError as error:
            raise LaunchError(f"cannot reach the tap helper at {socket_path}: {error.strerror}") from error
        connection.sendall(json.dumps(request).encode() + b"\n")
        message, fds, _, _ = socket.recv_fds(connection, REPLY_LIMIT, 1)
    try:
        reply = json.loads(message)
    except ValueError as error:
        raise LaunchError(f"the tap helper gave no answer for {tap.ifname} on {tap.bridge}") from error
    if "error" in reply or not fds:
        for fd in fds:
            os.close(fd)
        raise LaunchError(f"tap helper: {reply.get('error', 'no descriptor in its answer')}")
    return fds[0]


def start_passt(passt: PasstRequest) -> int:
    """passt on one end of a socket pair, QEMU's end returned; passt ends when QEMU closes it (--one-off).

    passt forks into the background once set up, so its exit status says whether it could be.
    """
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours, theirs:
        # --no-map-gw: the gateway address is the real gateway, never this node's loopback.
        argv = [PASST, "--quiet", "--one-off", "--no-map-gw", "--fd", str(theirs.fileno()), "--log-file", passt.log]
        try:
            result = subprocess.run(argv, pass_fds=[theirs.fileno()], capture_output=True, text=True, check=False)
        except FileNotFoundError as error:
            raise LaunchError("passt is not installed on this node (package passt); user-mode NAT needs it") from error
        if result.returncode != 0:
            lines = [line for line in result.stderr.splitlines() if "syslog" not in line]
            raise LaunchError(f"passt (user-mode NAT) could not start: {'; '.join(lines[-3:])}")
        return os.dup(ours.fileno())


def place(descriptors: dict[int, int]) -> None:
    """Move each descriptor to the number QEMU expects, inheritable; the originals are closed."""
    staged = {}
    for index, (target, fd) in enumerate(sorted(descriptors.items())):
        staged[target] = os.dup2(fd, STAGING_FD + index, inheritable=False)
        os.close(fd)
    for target, fd in staged.items():
        os.dup2(fd, target, inheritable=True)
        os.close(fd)


# What QEMU is given to receive a migration: the state comes later, over QMP (migrate-incoming), and
# the guest stays paused once it is in, until the agent has taken it as its own (migration.py).
INCOMING_ARGV = ("-incoming", "defer", "-S")


def incoming_once(marker: str) -> bool:
    """Whether this start receives a migration: the marker is there, and is used up by this start.
    A restart of the same unit (systemd's restart policy, after a crash) then boots the guest."""
    if not marker:
        return False
    try:
        os.unlink(marker)
    except FileNotFoundError:
        return False
    return True


def launch(plan: LaunchPlan, qemu_argv: list[str]) -> None:
    """Make the descriptors and exec QEMU; returns only by raising."""
    if incoming_once(plan.incoming):
        qemu_argv = [*qemu_argv, *INCOMING_ARGV]
    descriptors: dict[int, int] = {}
    try:
        for tap in plan.taps:
            descriptors[tap.fd] = request_tap(plan.tap_helper_socket, tap)
        for passt in plan.passt:
            descriptors[passt.fd] = start_passt(passt)
    except BaseException:
        for fd in descriptors.values():
            os.close(fd)
        raise
    place(descriptors)
    os.execvp(qemu_argv[0], qemu_argv)


def main(plan_json: str, qemu_argv: list[str]) -> int:
    if qemu_argv[:1] == ["--"]:
        qemu_argv = qemu_argv[1:]
    if not qemu_argv:
        print("launch-guest: no QEMU command line after --", file=sys.stderr)
        return 2
    try:
        launch(LaunchPlan.from_json(plan_json), qemu_argv)
    except LaunchError as error:
        print(f"launch-guest: {error}", file=sys.stderr)
        return 1
    except OSError as error:
        print(f"launch-guest: cannot run {qemu_argv[0]}: {error.strerror}", file=sys.stderr)
        return 1
    return 0

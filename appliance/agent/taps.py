"""`appliance-agent tap-helper`: the one privileged step of a bridged NIC, run as root per request.

On the node, systemd listens on /run/appliance/tap-helper.sock (mode 0660,
group of the agent user) and starts this once per connection with the
connection as stdin (`Accept=yes`, `StandardInput=socket`). It reads one
request, `{"ifname", "bridge", "vlan", "mac"}`, and either answers
`{"ifname": ...}` with the open tap's descriptor attached (SCM_RIGHTS) or
`{"error": ...}`. It only ever makes a new, non-persistent tap named like
the agent names them (nics.tap_name), on a bridge the config allows, and puts
it on that bridge (on the VLAN when one is asked for); it closes its own copy
of the descriptor when it exits, so the caller's copy is the only one.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import socket
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

from appliance.agent.errors import AgentError
from appliance.agent.host import SYS_CLASS_NET, read_sys_value
from appliance.agent.model import MAC_PATTERN, MAX_VLAN
from appliance.agent.nics import NetworkConfig
from appliance.agent.tools import find_program, run_tool

TUN_DEVICE = "/dev/net/tun"
TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
# virtio-net headers on the tap: what QEMU's virtio-net (and vhost-net) want.
IFF_VNET_HDR = 0x4000
TAP_NAME = re.compile(r"^vm[0-9a-f]{10}n[0-7]$")
REQUEST_LIMIT = 4096


class TapError(Exception):
    """The request was refused or the tap could not be made; the message goes back to the caller."""


@dataclass(frozen=True)
class Tap:
    """A tap to make, as checked from a request."""

    ifname: str
    bridge: str
    vlan: int
    mac: str


def parse_request(line: bytes, config: NetworkConfig, sys_class_net: Path = SYS_CLASS_NET) -> Tap:
    """The request, refused unless every part is what the agent would send for an allowed bridge."""
    try:
        data = json.loads(line)
    except ValueError as error:
        raise TapError("the request is not JSON") from error
    if not isinstance(data, dict) or set(data) != {"ifname", "bridge", "vlan", "mac"}:
        raise TapError("the request must have exactly ifname, bridge, vlan and mac")
    ifname, bridge, vlan, mac = data["ifname"], data["bridge"], data["vlan"], data["mac"]
    if not isinstance(ifname, str) or not TAP_NAME.fullmatch(ifname):
        raise TapError(f"{ifname!r} is not a guest tap name (vm + 10 hex digits + n + NIC index)")
    if bridge not in config.allowed_bridges:
        raise TapError(f"bridge {bridge!r} is not allowed for guests (allowed: {', '.join(config.allowed_bridges)})")
    if not (sys_class_net / bridge / "bridge").is_dir():
        raise TapError(f"there is no bridge {bridge!r} on this node")
    if isinstance(vlan, bool) or not isinstance(vlan, int) or not 0 <= vlan <= MAX_VLAN:
        raise TapError(f"vlan must be 0 (none) or 1 to {MAX_VLAN}")
    if vlan and read_sys_value(sys_class_net / bridge / "bridge" / "vlan_filtering") != "1":
        raise TapError(f"bridge {bridge!r} is not VLAN-aware; VLAN {vlan} cannot be set on it")
    if not isinstance(mac, str) or not MAC_PATTERN.fullmatch(mac) or int(mac[:2], 16) & 0x01:
        raise TapError(f"{mac!r} is not a unicast MAC address")
    return Tap(ifname=ifname, bridge=bridge, vlan=vlan, mac=mac)


def tap_mac(guest_mac: str) -> str:
    """The tap's own address: the guest's with first octet 0xfe (as libvirt does), so it is never the
    lowest on the bridge and the bridge's own address does not change as guests come and go."""
    return "fe" + guest_mac[2:]


def bridge_commands(request: Tap, bridge_mtu: int, default_pvid: int) -> list[list[str]]:
    """The ip/bridge commands that put a made tap on its bridge (and VLAN) and bring it up."""
    tap = request.ifname
    link = ["ip", "link", "set", "dev", tap, "address", tap_mac(request.mac)]
    if bridge_mtu:
        link += ["mtu", str(bridge_mtu)]
    commands = [[*link, "master", request.bridge]]
    if request.vlan:
        # The VLAN untagged on the tap (the guest sees plain frames), and the bridge's default one taken off.
        commands.append(["bridge", "vlan", "add", "dev", tap, "vid", str(request.vlan), "pvid", "untagged"])
        if default_pvid and default_pvid != request.vlan:
            commands.append(["bridge", "vlan", "del", "dev", tap, "vid", str(default_pvid)])
    commands.append(["ip", "link", "set", "dev", tap, "up"])
    return commands


def open_tap(ifname: str) -> int:
    """A new tap device; it lives as long as a descriptor to it is open (it is not made persistent)."""
    fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", ifname.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
    except OSError as error:
        os.close(fd)
        reason = "it exists already (is the guest's QEMU still running?)" if error.errno == 16 else error.strerror
        raise TapError(f"cannot make tap {ifname}: {reason}") from error
    return fd


def make_tap(request: Tap, sys_class_net: Path = SYS_CLASS_NET) -> int:
    bridge_dir = sys_class_net / request.bridge
    mtu = read_sys_value(bridge_dir / "mtu")
    pvid = read_sys_value(bridge_dir / "bridge" / "default_pvid")
    commands = bridge_commands(request, int(mtu) if mtu.isdigit() else 0, int(pvid) if pvid.isdigit() else 0)
    programs = {"ip": find_program("ip", "iproute2"), "bridge": find_program("bridge", "iproute2")}
    fd = open_tap(request.ifname)
    try:
        for command in commands:
            run_tool([programs[command[0]], *command[1:]])
    except AgentError as error:
        os.close(fd)
        raise TapError(f"cannot put tap {request.ifname} on bridge {request.bridge}: {error}") from error
    return fd


def serve_request(connection: socket.socket, config: NetworkConfig) -> None:
    """Answer one request on the connection; a refusal is an answer too."""
    line = connection.makefile("rb").readline(REQUEST_LIMIT)
    try:
        request = parse_request(line, config)
        fd = make_tap(request)
    except TapError as error:
        print(f"tap-helper: refused: {error}", file=sys.stderr)
        connection.sendall(json.dumps({"error": str(error)}).encode() + b"\n")
        return
    try:
        socket.send_fds(connection, [json.dumps({"ifname": request.ifname}).encode() + b"\n"], [fd])
    finally:
        os.close(fd)
    print(f"tap-helper: {request.ifname} on {request.bridge} (vlan {request.vlan or 'none'})", file=sys.stderr)


def main(config: NetworkConfig) -> int:
    """The connection is stdin, as systemd's socket activation (and `systemd-socket-activate --inetd`) gives it."""
    if os.geteuid() != 0:
        print("tap-helper: must run as root (it is started by appliance-tap-helper.socket)", file=sys.stderr)
        return 1
    with socket.socket(fileno=os.dup(0)) as connection:
        serve_request(connection, config)
    return 0

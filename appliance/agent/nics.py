"""Guest NICs on this node: checking them against the node, their MACs, and QEMU's part of the command line.

A NIC on a bridge is a tap device. QEMU runs unprivileged (as the agent
user, with `-sandbox on`), so it cannot make one: the root tap helper
(taps.py, behind a unix socket only the agent user may use) creates the tap
on a bridge the node's config allows and hands back its open file
descriptor, as libvirt does. QEMU's own qemu-bridge-helper cannot serve:
`-sandbox on` sets no_new_privs before QEMU runs the helper, so a setuid
helper never gains root.

User-mode NAT is passt (`--no-map-gw`), not QEMU's built-in slirp: slirp
forwards whatever the guest sends to its gateway address (10.0.2.2) to the
node's own loopback, so a guest reached every service listening on
127.0.0.1, and QEMU offers no way to turn that off short of `restrict=on`,
which cuts the guest off from the outside too. passt without gateway mapping
reaches the outside as the node does and nothing on its loopback.

Either way the descriptors are made by the guest's launcher (launch.py),
which runs in place of QEMU (so also under systemd, and again on every
restart) and then becomes QEMU: only QEMU holds a tap's descriptor, so the
tap goes away when QEMU does, however it ends; passt (`--one-off`) ends when
QEMU closes its socket.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from appliance.agent.host import Bridge, read_bridges
from appliance.agent.model import GuestSpec, Nic, NicModel, invalid_field

DEFAULT_TAP_HELPER_SOCKET = Path("/run/appliance/tap-helper.sock")
DEFAULT_ALLOWED_BRIDGES = ("br0",)
MACHINE_ID = Path("/etc/machine-id")
VHOST_NET = Path("/dev/vhost-net")
PASST = "passt"
# File descriptors the launcher gives QEMU start here (after stdin, stdout, stderr).
FIRST_FD = 3
QEMU_DEVICE = {NicModel.VIRTIO: "virtio-net-pci", NicModel.E1000: "e1000", NicModel.RTL8139: "rtl8139"}


@dataclass(frozen=True)
class NetworkConfig:
    """The agent config's [network] table: the bridges guests may use, and where the tap helper listens."""

    allowed_bridges: tuple[str, ...] = DEFAULT_ALLOWED_BRIDGES
    tap_helper_socket: Path = DEFAULT_TAP_HELPER_SOCKET


def read_node_id(path: Path = MACHINE_ID) -> str:
    """What makes this node's derived MACs its own: the machine id, else the host name."""
    try:
        node_id = path.read_text().strip()
    except OSError:
        node_id = ""
    return node_id or socket.gethostname()


def derive_mac(node_id: str, guest: str, index: int, attempt: int = 0) -> str:
    """A locally administered unicast MAC (first octet 0x52: bit 0x02 set, 0x01 clear) from the node,
    the guest and the NIC; 40 bits of hash, so guests of many nodes on one LAN do not meet."""
    digest = hashlib.sha256(f"{node_id}\0{guest}\0{index}\0{attempt}".encode()).digest()
    return ":".join(f"{octet:02x}" for octet in (0x52, *digest[:5]))


def tap_name(guest: str, index: int) -> str:
    """The tap's interface name: 14 characters (IFNAMSIZ allows 15), the same for a guest's NIC every start."""
    return f"vm{hashlib.sha256(guest.encode()).hexdigest()[:10]}n{index}"


def macs_in_use(guests: list[GuestSpec]) -> dict[str, str]:
    return {nic.mac: guest.name for guest in guests for nic in guest.nics if nic.mac}


def check_bridge(nic: Nic, index: int, config: NetworkConfig, bridges: dict[str, Bridge]) -> None:
    """A bridged NIC's bridge exists here, the tap helper may use it, and it filters VLANs if a VLAN is asked for."""
    where = f"nics[{index}]"
    if nic.bridge not in bridges:
        present = ", ".join(sorted(bridges)) or "none"
        raise invalid_field(f"{where}.bridge", f"no bridge {nic.bridge!r} on this node (its bridges: {present})")
    if nic.bridge not in config.allowed_bridges:
        allowed = ", ".join(config.allowed_bridges) or "none"
        raise invalid_field(
            f"{where}.bridge", f"bridge {nic.bridge!r} is not one guests may use on this node (allowed: {allowed})"
        )
    if nic.vlan and not bridges[nic.bridge].vlan_filtering:
        raise invalid_field(
            f"{where}.vlan", f"bridge {nic.bridge!r} is not VLAN-aware (vlan_filtering is off); a VLAN needs one"
        )


def check_nics_on_node(spec: GuestSpec, config: NetworkConfig, bridges: dict[str, Bridge]) -> None:
    for index, nic in enumerate(spec.nics):
        if not nic.user:
            check_bridge(nic, index, config, bridges)


def assign_nics(
    spec: GuestSpec,
    others: list[GuestSpec],
    config: NetworkConfig,
    bridges: dict[str, Bridge] | None = None,
    node_id: str | None = None,
) -> GuestSpec:
    """The spec checked against this node, with a MAC for every NIC: given ones refused if another guest
    has them, derived ones moved on (a new attempt) until no guest here has them."""
    check_nics_on_node(spec, config, read_bridges() if bridges is None else bridges)
    taken = macs_in_use([other for other in others if other.name != spec.name])
    for index, nic in enumerate(spec.nics):
        if nic.mac in taken:
            raise invalid_field(f"nics[{index}].mac", f"{nic.mac} is already used by guest {taken[nic.mac]!r}")
    own = {nic.mac for nic in spec.nics if nic.mac}
    node = read_node_id() if node_id is None else node_id
    assigned = []
    for index, nic in enumerate(spec.nics):
        attempt = 0
        while not nic.mac:
            candidate = derive_mac(node, spec.name, index, attempt)
            if candidate not in taken and candidate not in own:
                nic = replace(nic, mac=candidate)
                own.add(candidate)
            attempt += 1
        assigned.append(nic)
    return replace(spec, nics=tuple(assigned))


@dataclass(frozen=True)
class TapRequest:
    """What the launcher asks the tap helper for, and the descriptor number QEMU is told to use."""

    fd: int
    ifname: str
    bridge: str
    vlan: int
    mac: str


@dataclass(frozen=True)
class PasstRequest:
    fd: int
    log: str


@dataclass(frozen=True)
class LaunchPlan:
    """The descriptors a guest's launcher makes before it becomes QEMU."""

    tap_helper_socket: str
    taps: list[TapRequest] = field(default_factory=list)
    passt: list[PasstRequest] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.taps or self.passt)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> LaunchPlan:
        data = json.loads(text)
        return cls(
            tap_helper_socket=data["tap_helper_socket"],
            taps=[TapRequest(**tap) for tap in data["taps"]],
            passt=[PasstRequest(**passt) for passt in data["passt"]],
        )


def vhost_usable(device: Path = VHOST_NET) -> bool:
    return device.exists() and os.access(device, os.R_OK | os.W_OK)


def nic_argv(
    spec: GuestSpec, directory: Path, config: NetworkConfig, boot_from: int | None = None
) -> tuple[list[str], LaunchPlan]:
    """QEMU's -netdev/-device arguments for the guest's NICs, and the descriptors they need made first.

    With `boot_from` (the guest boots from the network) the NICs take boot indexes from it and keep
    their option ROM (iPXE), which otherwise is left out."""
    argv: list[str] = []
    plan = LaunchPlan(tap_helper_socket=str(config.tap_helper_socket))
    vhost = ",vhost=on" if vhost_usable(VHOST_NET) else ""
    for index, nic in enumerate(spec.nics):
        fd = FIRST_FD + index
        netdev = f"net{index}"
        if nic.user:
            plan.passt.append(PasstRequest(fd=fd, log=str(directory / f"passt-{netdev}.log")))
            argv += ["-netdev", f"stream,id={netdev},addr.type=fd,addr.str={fd}"]
        else:
            plan.taps.append(
                TapRequest(fd=fd, ifname=tap_name(spec.name, index), bridge=nic.bridge, vlan=nic.vlan, mac=nic.mac)
            )
            argv += ["-netdev", f"tap,id={netdev},fd={fd}{vhost}"]
        mac = f",mac={nic.mac}" if nic.mac else ""
        boot = ",romfile=" if boot_from is None else f",bootindex={boot_from + index}"
        argv += ["-device", f"{QEMU_DEVICE[nic.model]},netdev={netdev}{mac}{boot}"]
    return argv, plan


def launch_argv(agent_command: tuple[str, ...], plan: LaunchPlan, qemu_argv: list[str]) -> list[str]:
    """QEMU's command line as it is run: through the launcher when NICs need descriptors made first."""
    if not plan:
        return qemu_argv
    return [*agent_command, "launch-guest", plan.to_json(), "--", *qemu_argv]

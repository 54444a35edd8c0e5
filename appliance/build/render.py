"""Spec -> files, through the jinja2 templates in templates/.

Pure: reads templates and writes only below the directory it is given, so it
is testable without a build. templates/image/ELEMENT/PATH.j2 becomes
ELEMENT/static/PATH in the elements directory handed to DIB; templates/boot/
holds the boot loader files the packer needs. (The disk's partition table is
data, written by appliance.agent.disklayout, which the node uses too.)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import jinja2

from appliance.build.layout import TEMPLATES_DIR
from appliance.network import FIRST_WIRED, Network
from appliance.spec import BREAK_GLASS_USER, Spec

READY_MARKER = "APPLIANCE-READY"


@dataclass(frozen=True)
class BuildIdentity:
    """What makes one build of a spec distinct: written to /etc/appliance/build.json."""

    build_id: str
    created: str
    spec_sha256: str
    tool_version: str


def _environment(templates_dir: Path) -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(templates_dir),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
    )


def kernel_cmdline(spec: Spec, templates_dir: Path = TEMPLATES_DIR, fetch_url: str = "") -> str:
    """The kernel command line; with fetch_url, live-boot downloads the root from there (PXE)."""
    text = _environment(templates_dir).get_template("boot/cmdline.j2").render(spec=spec, fetch_url=fetch_url)
    return " ".join(text.split())


def build_info(spec: Spec, identity: BuildIdentity, templates_dir: Path = TEMPLATES_DIR) -> dict[str, object]:
    """The contents of /etc/appliance/build.json."""
    return {
        **asdict(identity),
        "name": spec.name,
        "release": spec.release,
        "hostname": spec.hostname,
        "kernel_cmdline": kernel_cmdline(spec, templates_dir),
        "ready_marker": READY_MARKER,
    }


def render_image_files(
    spec: Spec, identity: BuildIdentity, elements_dir: Path, templates_dir: Path = TEMPLATES_DIR
) -> list[Path]:
    """Render templates/image/ into each element's static/ tree; returns the files written."""
    environment = _environment(templates_dir)
    context = {
        "spec": spec,
        "build": build_info(spec, identity, templates_dir),
        "ready_marker": READY_MARKER,
        "break_glass_user": BREAK_GLASS_USER,
    }
    written = []
    image_root = templates_dir / "image"
    for template_path in sorted(image_root.rglob("*.j2")):
        relative = template_path.relative_to(image_root)
        element, inside = relative.parts[0], Path(*relative.parts[1:])
        target = elements_dir / element / "static" / inside.with_suffix("")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(environment.get_template(f"image/{relative.as_posix()}").render(context))
        written.append(target)
    return written + render_network_files(spec.network, elements_dir, templates_dir)


# A name no NIC has: the ports file of the bridge that takes "first-wired" lists it until
# appliance-network.service adds the NIC it found (a drop-in), so networkd never
# matches a .network whose Name= would otherwise be empty (an empty match takes every link).
FIRST_WIRED_PLACEHOLDER = "appliance-first-wired"
NETWORK_UNITS = Path("appliance-network/static/etc/systemd/network")
NETWORK_ENV = Path("appliance-network/static/etc/appliance/network.env")


@dataclass(frozen=True)
class NetworkUnit:
    """One systemd-networkd file: its name, its template, what the template reads."""

    name: str
    template: str
    values: Mapping[str, object]


def network_units(network: Network) -> list[NetworkUnit]:
    """The networkd files [network] asks for, named so networkd reads them in this order."""
    management = network.management
    management_vlan = f"{management.interface}.{management.vlan}" if management.vlan else ""
    units = []
    for bond in network.bonds:
        units.append(NetworkUnit(f"10-appliance-{bond.name}.netdev", "bond.netdev", {"bond": bond}))
        units.append(NetworkUnit(f"20-appliance-{bond.name}-ports.network", "bond-ports.network", {"bond": bond}))
    for bridge in network.bridges:
        first_wired = FIRST_WIRED in bridge.ports
        names = [FIRST_WIRED_PLACEHOLDER if port == FIRST_WIRED else port for port in bridge.ports]
        units.append(NetworkUnit(f"10-appliance-{bridge.name}.netdev", "bridge.netdev", {"bridge": bridge}))
        units.append(
            NetworkUnit(
                f"30-appliance-{bridge.name}-ports.network",
                "bridge-ports.network",
                {"bridge": bridge, "names": names, "first_wired": first_wired},
            )
        )
    if management_vlan:
        values = {"name": management_vlan, "parent": management.interface, "vlan": management.vlan}
        units.append(NetworkUnit(f"15-appliance-{management_vlan}.netdev", "vlan.netdev", values))
    # Every bridge and bond that is no port of another gets its own .network (it must be up),
    # and the interface holding the node's address gets that address.
    ports = {port for bridge in network.bridges for port in bridge.ports}
    interfaces = [bridge.name for bridge in network.bridges] + [
        bond.name for bond in network.bonds if bond.name not in ports
    ]
    if management.interface not in interfaces:
        interfaces.append(management.interface)
    for name in interfaces:
        carries_vlan = bool(management_vlan) and name == management.interface
        values = {
            "name": name,
            "management": management if name == management.interface and not carries_vlan else None,
            "vlans": [management_vlan] if carries_vlan else [],
            "bridge_vlans": [management.vlan] if carries_vlan else [],
        }
        units.append(NetworkUnit(f"40-appliance-{name}.network", "interface.network", values))
    if management_vlan:
        values = {"name": management_vlan, "management": management, "vlans": [], "bridge_vlans": []}
        units.append(NetworkUnit(f"40-appliance-{management_vlan}.network", "interface.network", values))
    return units


def render_network_files(network: Network, elements_dir: Path, templates_dir: Path = TEMPLATES_DIR) -> list[Path]:
    """[network] as systemd-networkd units (templates/network/), and the env file appliance-network.service reads."""
    environment = _environment(templates_dir)
    written = []
    units = network_units(network)
    for unit in units:
        target = elements_dir / NETWORK_UNITS / unit.name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(environment.get_template(f"network/{unit.template}.j2").render(unit.values))
        written.append(target)
    first_wired = next((unit.name for unit in units if unit.values.get("first_wired")), "")
    management = network.management
    holds_address = f"{management.interface}.{management.vlan}" if management.vlan else management.interface
    env = elements_dir / NETWORK_ENV
    env.parent.mkdir(parents=True, exist_ok=True)
    env.write_text(
        environment.get_template("network/network.env.j2").render(
            management_interface=holds_address,
            first_wired_unit=first_wired,
        )
    )
    return [*written, env]


def render_boot_file(
    name: str,
    spec: Spec,
    identity: BuildIdentity,
    templates_dir: Path = TEMPLATES_DIR,
    values: Mapping[str, object] | None = None,
) -> str:
    """Render templates/boot/NAME.j2 (grub.cfg, ...) for the packer; `values` are what the packer
    alone knows (labels, a file system's serial) on top of the spec's."""
    context = {
        "spec": spec,
        "build": build_info(spec, identity, templates_dir),
        "cmdline": kernel_cmdline(spec, templates_dir),
        "serial_unit": int(spec.console.serial_port.removeprefix("ttyS")),
        **(values or {}),
    }
    return _environment(templates_dir).get_template(f"boot/{name}.j2").render(context)

"""Guest definitions as the guest module compares them: the task's options and guest.info's stored definition
brought to one shape, the shape guest.create takes (appliance.agent.model.GuestSpec.to_params).

Only what the task gives is compared: an option left out keeps what the node
has. A NIC given without a MAC takes the MAC of the node's NIC at its place,
so a definition whose MACs the node derived does not look changed, and an
update keeps them. Standard library only: the unit tests import it without
Ansible.
"""

from __future__ import annotations

import json
from typing import Any

# guest.update takes these; disks have no update (guest.update refuses them).
UPDATABLE = (
    "vcpus",
    "memory_mib",
    "autostart",
    "restart",
    "kernel_boot",
    "nics",
    "cloud_init",
    "cpu_weight",
    "cpu_quota_percent",
)
FIELDS = ("vcpus", "memory_mib", "disks", *UPDATABLE[2:])
# Sections that `{}` in a task removes (guest.update takes null for them).
SECTIONS = ("kernel_boot", "cloud_init")
DEFAULT_NIC_MODEL = "virtio"


class DisksDiffer(Exception):
    """The task's disks are not the guest's: guest.update cannot change disks."""

    def __init__(self, name: str, have: list[dict[str, Any]], want: list[dict[str, Any]]) -> None:
        super().__init__(
            f"guest {name!r}: disks cannot change through an update (the node has {json.dumps(have)}, the task "
            f"gives {json.dumps(want)}); leave disks out, or remove the guest (state=absent) and create it again"
        )


def stored(definition: dict[str, Any]) -> dict[str, Any]:
    """guest.info's `definition` (GuestSpec.to_json) in guest.create's shape, every field present;
    kernel_boot and cloud_init None when the guest has none."""
    nics = definition.get("nics", [])
    if isinstance(nics, int):  # definitions stored before NICs were objects: a count of user-mode NICs
        nics = [{"user": True}] * nics
    return {
        "vcpus": definition["vcpus"],
        "memory_mib": definition["memory_mib"],
        "disks": [disk_shape(disk) for disk in definition.get("disks", [])],
        "nics": [nic_shape(nic) for nic in nics],
        "kernel_boot": section_shape(definition.get("kernel_boot")),
        "autostart": definition.get("autostart", False),
        "restart": definition.get("restart", "never"),
        "cpu_weight": definition.get("cpu_weight", 100),
        "cpu_quota_percent": definition.get("cpu_quota_percent", 0),
        "cloud_init": cloud_init_shape(definition.get("cloud_init")),
    }


def wanted(options: dict[str, Any]) -> dict[str, Any]:
    """The fields the task gives (Ansible's None: not given), in guest.create's shape."""
    given = {field: options[field] for field in FIELDS if options.get(field) is not None}
    shaped: dict[str, Any] = {}
    for field, value in given.items():
        if field == "disks":
            shaped[field] = [disk_shape(disk) for disk in value]
        elif field == "nics":
            shaped[field] = [nic_shape(nic) for nic in value]
        elif field == "kernel_boot":
            shaped[field] = section_shape(value)
        elif field == "cloud_init":
            shaped[field] = cloud_init_shape(value)
        else:
            shaped[field] = value
    return shaped


def disk_shape(disk: dict[str, Any]) -> dict[str, Any]:
    if disk.get("base_image"):
        return {"base_image": disk["base_image"]}
    return {"size_gib": disk.get("size_gib")}


def nic_shape(nic: dict[str, Any]) -> dict[str, Any]:
    # Both kept when both are given (or neither): the agent refuses that, naming the NIC.
    shaped: dict[str, Any] = {"user": True} if nic.get("user") else {}
    if nic.get("bridge") or not nic.get("user"):
        shaped["bridge"] = nic.get("bridge")
    if nic.get("vlan"):
        shaped["vlan"] = nic["vlan"]
    if nic.get("mac"):
        shaped["mac"] = str(nic["mac"]).lower()
    shaped["model"] = nic.get("model") or DEFAULT_NIC_MODEL
    return shaped


def section_shape(section: dict[str, Any] | None) -> dict[str, Any] | None:
    """A section without its empty values; None when nothing is left (`{}` in a task: remove it)."""
    if section is None:
        return None
    kept = {key: value for key, value in section.items() if not empty(value)}
    return kept or None


def empty(value: Any) -> bool:
    return value is None or value == "" or (isinstance(value, list | tuple | dict) and not value)


def cloud_init_shape(section: dict[str, Any] | None) -> dict[str, Any] | None:
    """As the agent keeps it: keys as `TYPE BASE64 [COMMENT]`, a network config object as sorted JSON text."""
    shaped = section_shape(section)
    if shaped is None:
        return None
    if "ssh_authorized_keys" in shaped:
        shaped["ssh_authorized_keys"] = [" ".join(str(key).strip().split(maxsplit=2))
                                         for key in shaped["ssh_authorized_keys"]]  # fmt: skip
    if isinstance(shaped.get("network_config"), dict):
        shaped["network_config"] = json.dumps(shaped["network_config"], sort_keys=True)
    return shaped


def with_stored_macs(want: dict[str, Any], have: dict[str, Any]) -> dict[str, Any]:
    """WANT with each NIC given without a MAC taking the MAC of the guest's NIC at its place (unless the task
    gives that MAC to another NIC)."""
    if "nics" not in want:
        return want
    given = {nic["mac"] for nic in want["nics"] if "mac" in nic}
    nics = []
    for index, nic in enumerate(want["nics"]):
        if "mac" not in nic and index < len(have["nics"]):
            mac = have["nics"][index].get("mac")
            if mac and mac not in given:
                nic = {**without_model(nic), "mac": mac, "model": nic["model"]}
        nics.append(nic)
    return {**want, "nics": nics}


def without_model(nic: dict[str, Any]) -> dict[str, Any]:
    # Keys in the order nic_shape writes them, so a diff reads the same on both sides.
    return {key: value for key, value in nic.items() if key != "model"}


def changes(name: str, want: dict[str, Any], have: dict[str, Any]) -> dict[str, Any]:
    """The guest.update params that make HAVE what WANT says (None removes a section); DisksDiffer when the
    disks differ."""
    if "disks" in want and want["disks"] != have["disks"]:
        raise DisksDiffer(name, have["disks"], want["disks"])
    return {field: value for field, value in want.items() if field != "disks" and value != have[field]}


def create_params(name: str, want: dict[str, Any]) -> dict[str, Any]:
    """guest.create's params for a new guest: what the task gives, absent sections left out."""
    return {"name": name, **{field: value for field, value in want.items() if value is not None}}


def predicted(have: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """The definition after UPDATE, as check mode reports it."""
    return {**have, **update}

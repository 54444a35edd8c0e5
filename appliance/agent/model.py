"""Guest definitions as requests give them: checked field by field, unknown fields refused."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace
from enum import StrEnum
from typing import Any

from appliance.agent.errors import AgentError, ErrorCode
from appliance.agent.seed import check_cloud_init_text, check_hostname, check_network_config, check_ssh_key

# Names become file and unit names: no separators, no dots-only, bounded.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
MAX_VCPUS = 256
MAX_MEMORY_MIB = 4 * 1024 * 1024
MAX_DISK_GIB = 64 * 1024
MAX_DISKS = 16
MAX_NICS = 8
# Bridge names are interface names (IFNAMSIZ - 1 characters), never a path.
BRIDGE_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,14}$")
MAC_PATTERN = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
MAX_VLAN = 4094
USER_NAME_PATTERN = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
MAX_SSH_KEYS = 64
MAX_CMDLINE = 4096
# cgroup v2 cpu.weight: 1..10000, the kernel's default 100.
MAX_CPU_WEIGHT = 10000
DEFAULT_CPU_WEIGHT = 100


class RestartPolicy(StrEnum):
    NEVER = "never"
    ON_FAILURE = "on-failure"
    ALWAYS = "always"


@dataclass(frozen=True)
class Disk:
    """One guest disk: blank (`size_gib`) or over an image of the store (`base_image`; a `size_gib`
    beside it is the size it was grown to). `file` is its file in the guest's directory, named when the
    disk is made and kept while it is attached, so removing one disk never renames the others."""

    size_gib: int = 0
    base_image: str = ""
    file: str = ""


class BootDevice(StrEnum):
    """What a guest's boot_order names: its disks, its CD-ROM, its NICs (network boot), its kernel_boot."""

    DISK = "disk"
    CDROM = "cdrom"
    NETWORK = "network"
    KERNEL = "kernel"


class NicModel(StrEnum):
    VIRTIO = "virtio"
    E1000 = "e1000"
    RTL8139 = "rtl8139"


@dataclass(frozen=True)
class Nic:
    """One guest NIC: on a bridge of the node (with an optional VLAN), or user-mode NAT (`user`).

    `mac` is empty only in definitions stored before NICs had MACs (QEMU then picks one);
    every NIC created since has one, given or derived (nics.py).
    """

    user: bool = False
    bridge: str = ""
    vlan: int = 0
    mac: str = ""
    model: NicModel = NicModel.VIRTIO


@dataclass(frozen=True)
class CloudInit:
    """What the guest's NoCloud seed carries (seed.py builds it); empty strings are absent."""

    hostname: str = ""
    ssh_authorized_keys: tuple[str, ...] = ()
    user: str = ""
    user_data: str = ""
    # A v2 network config: as JSON text when given as an object, else the YAML text given.
    network_config: str = ""
    vendor_data: str = ""


@dataclass(frozen=True)
class KernelBoot:
    kernel_image: str
    initrd_image: str = ""
    cmdline: str = ""


@dataclass(frozen=True)
class GuestSpec:
    name: str
    vcpus: int
    memory_mib: int
    disks: tuple[Disk, ...] = ()
    nics: tuple[Nic, ...] = ()
    kernel_boot: KernelBoot | None = None
    autostart: bool = False
    restart: RestartPolicy = RestartPolicy.NEVER
    # CPU share against other guests, and a hard limit in percent of one CPU (0: none).
    cpu_weight: int = DEFAULT_CPU_WEIGHT
    cpu_quota_percent: int = 0
    cloud_init: CloudInit | None = None
    # An ISO image of the store attached read-only as a CD-ROM ("" for none).
    cdrom: str = ""
    # The devices the firmware tries, in order (empty: the firmware's own order, disks first).
    boot_order: tuple[BootDevice, ...] = ()
    # A graphical console (a VGA device and QEMU's VNC server on a unix socket), for installers.
    display: bool = False

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def to_params(self) -> dict[str, Any]:
        """The guest.create params that define this guest (the inverse of parse_guest_spec)."""
        params = {**self.to_json(), "restart": self.restart.value}
        params["disks"] = [
            {"base_image": disk.base_image} if disk.base_image else {"size_gib": disk.size_gib} for disk in self.disks
        ]
        if self.kernel_boot is None:
            del params["kernel_boot"]
        else:
            params["kernel_boot"] = {key: value for key, value in asdict(self.kernel_boot).items() if value}
        params["nics"] = [nic_params(nic) for nic in self.nics]
        # Install media only where the guest has them, as guest.create takes them (absent: none).
        params["boot_order"] = [device.value for device in self.boot_order]
        for field in MEDIA_FIELDS:
            if not params[field]:
                del params[field]
        if self.cloud_init is None:
            del params["cloud_init"]
        else:
            section = asdict(self.cloud_init)
            params["cloud_init"] = {key: list(value) if isinstance(value, tuple) else value
                                    for key, value in section.items() if value}  # fmt: skip
        return params

    def images_used(self) -> set[str]:
        used = {disk.base_image for disk in self.disks if disk.base_image}
        if self.kernel_boot:
            used |= {self.kernel_boot.kernel_image, self.kernel_boot.initrd_image} - {""}
        if self.cdrom:
            used.add(self.cdrom)
        return used

    def devices(self) -> set[BootDevice]:
        """What this guest has to boot from."""
        present = {
            BootDevice.DISK: bool(self.disks),
            BootDevice.CDROM: bool(self.cdrom),
            BootDevice.NETWORK: bool(self.nics),
            BootDevice.KERNEL: self.kernel_boot is not None,
        }
        return {device for device, there in present.items() if there}


def invalid(message: str, field: str) -> AgentError:
    return AgentError(ErrorCode.INVALID_PARAMS, message, {"field": field})


def invalid_field(field: str, message: str) -> AgentError:
    """`field`: `message`, as the error's message and naming the field."""
    return invalid(f"{field}: {message}", field)


def check_name(value: object, field: str = "name") -> str:
    if not isinstance(value, str) or not NAME_PATTERN.fullmatch(value) or set(value) <= {"."}:
        raise invalid(
            f"{field} must be 1-63 characters of letters, digits, '_', '.', '-', starting with a letter or digit",
            field,
        )
    return value


def check_int(params: dict[str, Any], field: str, low: int, high: int, default: int | None = None) -> int:
    value = params.get(field, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise invalid(f"{field} must be a whole number from {low} to {high}", field)
    return value


def check_fields(params: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise invalid(f"unknown field(s) in {where}: {', '.join(unknown)}", f"{where}.{unknown[0]}")


def parse_guest_spec(params: dict[str, Any]) -> GuestSpec:
    check_fields(
        params,
        {"name", "vcpus", "memory_mib", "disks", "nics", "kernel_boot", "autostart", "restart", "cloud_init"}
        | CPU_FIELDS
        | MEDIA_FIELDS,
        "guest",
    )
    disks_value = params.get("disks", [])
    if not isinstance(disks_value, list) or len(disks_value) > MAX_DISKS:
        raise invalid(f"disks must be a list of at most {MAX_DISKS} disks", "disks")
    disks = tuple(parse_disk(disk, index) for index, disk in enumerate(disks_value))
    autostart = params.get("autostart", False)
    if not isinstance(autostart, bool):
        raise invalid("autostart must be true or false", "autostart")
    try:
        restart = RestartPolicy(params.get("restart", "never"))
    except ValueError as error:
        raise invalid(f"restart must be one of {', '.join(RestartPolicy)}", "restart") from error
    boot = params.get("kernel_boot")
    display = params.get("display", False)
    if not isinstance(display, bool):
        raise invalid_field("display", "must be true or false")
    cdrom = params.get("cdrom")  # absent, null or "": none, as kernel_boot and cloud_init
    vcpus = check_int(params, "vcpus", 1, MAX_VCPUS, 1)
    weight, quota = parse_cpu_limits(params, vcpus, DEFAULT_CPU_WEIGHT, 0)
    spec = GuestSpec(
        name=check_name(params.get("name")),
        vcpus=vcpus,
        memory_mib=check_int(params, "memory_mib", 16, MAX_MEMORY_MIB),
        disks=disks,
        nics=parse_nics(params.get("nics", [])),
        kernel_boot=None if boot is None else parse_kernel_boot(boot),
        autostart=autostart,
        restart=restart,
        cpu_weight=weight,
        cpu_quota_percent=quota,
        cloud_init=None if params.get("cloud_init") is None else parse_cloud_init(params["cloud_init"]),
        cdrom="" if cdrom is None or cdrom == "" else check_name(cdrom, "cdrom"),
        display=display,
    )
    if not spec.devices():
        raise invalid("the guest has nothing to boot: give it disks, a CD-ROM, a kernel_boot or a NIC", "disks")
    return replace(spec, boot_order=parse_boot_order(params.get("boot_order", []), spec.devices()))


# The fields of a guest's install media and consoles: its CD-ROM, its boot order, its display.
MEDIA_FIELDS = {"cdrom", "boot_order", "display"}


def parse_boot_order(value: object, present: set[BootDevice]) -> tuple[BootDevice, ...]:
    """The devices to boot from, in order: each once, each one the guest has; a kernel first (QEMU boots
    a -kernel before any device: its option ROM takes the first boot index)."""
    allowed = ", ".join(BootDevice)
    if not isinstance(value, list):
        raise invalid_field("boot_order", f"must be a list of devices, in order, from {allowed}")
    order: list[BootDevice] = []
    for index, item in enumerate(value):
        where = f"boot_order[{index}]"
        try:
            device = BootDevice(item)
        except ValueError as error:
            raise invalid_field(where, f"{item!r} is not a boot device; allowed: {allowed}") from error
        if device in order:
            raise invalid_field(where, f"{device} is named twice")
        if device not in present:
            has = ", ".join(sorted(present)) or "nothing"
            raise invalid_field(where, f"the guest has no {device} to boot from (it has: {has})")
        if device is BootDevice.KERNEL and index != 0:
            raise invalid_field(where, "a kernel_boot boots before every device; put kernel first")
        order.append(device)
    return tuple(order)


CPU_FIELDS = {"cpu_weight", "cpu_quota_percent"}


def parse_cpu_limits(params: dict[str, Any], vcpus: int, weight: int, quota: int) -> tuple[int, int]:
    """cpu_weight and cpu_quota_percent from params, the given values where absent."""
    return (
        check_int(params, "cpu_weight", 1, MAX_CPU_WEIGHT, weight),
        # More than 100% per vCPU cannot be used, so it is refused rather than kept.
        check_int(params, "cpu_quota_percent", 0, 100 * vcpus, quota),
    )


def parse_disk(value: object, index: int) -> Disk:
    where = f"disks[{index}]"
    if not isinstance(value, dict):
        raise invalid(f"{where} must be an object", where)
    check_fields(value, {"size_gib", "base_image"}, where)
    if "base_image" in value:
        if "size_gib" in value:
            raise invalid(f"{where}: give size_gib or base_image, not both", where)
        return Disk(base_image=check_name(value["base_image"], f"{where}.base_image"), file=disk_file(index))
    return Disk(size_gib=check_int(value, "size_gib", 1, MAX_DISK_GIB), file=disk_file(index))


def disk_file(number: int) -> str:
    """The file of a disk in its guest's directory: disk0.qcow2, disk1.qcow2, ..."""
    return f"disk{number}.qcow2"


def nic_params(nic: Nic) -> dict[str, Any]:
    """A NIC as guest.create takes it."""
    params: dict[str, Any] = {"user": True} if nic.user else {"bridge": nic.bridge}
    if nic.vlan:
        params["vlan"] = nic.vlan
    if nic.mac:
        params["mac"] = nic.mac
    params["model"] = nic.model.value
    return params


def parse_nics(value: object) -> tuple[Nic, ...]:
    """A list of NIC objects; a whole number N, as older clients send, is N user-mode NICs."""
    if isinstance(value, int) and not isinstance(value, bool):
        if not 0 <= value <= MAX_NICS:
            raise invalid(f"nics must be a list of at most {MAX_NICS} NICs (or a count from 0 to {MAX_NICS})", "nics")
        return tuple(Nic(user=True) for _ in range(value))
    if not isinstance(value, list) or len(value) > MAX_NICS:
        raise invalid(f"nics must be a list of at most {MAX_NICS} NICs", "nics")
    nics = tuple(parse_nic(nic, index) for index, nic in enumerate(value))
    seen: set[str] = set()
    for index, nic in enumerate(nics):
        if nic.mac in seen:
            raise invalid_field(f"nics[{index}].mac", f"{nic.mac} is given to an earlier NIC of this guest too")
        if nic.mac:
            seen.add(nic.mac)
    return nics


def parse_nic(value: object, index: int) -> Nic:
    where = f"nics[{index}]"
    if not isinstance(value, dict):
        raise invalid_field(where, 'must be an object: {"bridge": "br0", ...} or {"user": true}')
    check_fields(value, {"user", "bridge", "vlan", "mac", "model"}, where)
    user = value.get("user", False)
    if not isinstance(user, bool):
        raise invalid_field(f"{where}.user", "must be true or false")
    if user == ("bridge" in value):
        raise invalid_field(where, 'give a bridge ({"bridge": "br0"}) or user-mode NAT ({"user": true}), one of them')
    if user and "vlan" in value:
        raise invalid_field(f"{where}.vlan", "a VLAN needs a bridge; user-mode NAT has none")
    bridge = value.get("bridge", "")
    if not user and (not isinstance(bridge, str) or not BRIDGE_PATTERN.fullmatch(bridge)):
        raise invalid_field(f"{where}.bridge", "must be an interface name of 1-15 letters, digits, '_', '.', '-'")
    vlan = 0
    if "vlan" in value:
        vlan = value["vlan"]
        if isinstance(vlan, bool) or not isinstance(vlan, int) or not 1 <= vlan <= MAX_VLAN:
            raise invalid_field(f"{where}.vlan", f"must be a VLAN id from 1 to {MAX_VLAN}")
    try:
        model = NicModel(value.get("model", NicModel.VIRTIO))
    except ValueError as error:
        raise invalid_field(f"{where}.model", f"must be one of {', '.join(NicModel)}") from error
    return Nic(user=user, bridge=bridge, vlan=vlan, mac=parse_mac(value.get("mac", ""), f"{where}.mac"), model=model)


def parse_mac(value: object, field: str) -> str:
    """A unicast MAC as six colon-separated hex octets, kept in lower case; "" when not given."""
    if value == "":
        return ""
    if not isinstance(value, str) or not MAC_PATTERN.fullmatch(value.lower()):
        raise invalid_field(field, "must be six hex octets separated by ':', e.g. 52:54:00:12:34:56")
    mac = value.lower()
    first = int(mac[:2], 16)
    if first & 0x01:
        raise invalid_field(field, f"{mac} is a multicast address; a NIC needs a unicast one (first octet even)")
    if mac == "00:00:00:00:00:00":
        raise invalid_field(field, "00:00:00:00:00:00 is not a usable address")
    return mac


CLOUD_INIT_FIELDS = ("hostname", "ssh_authorized_keys", "user", "user_data", "network_config", "vendor_data")


def parse_cloud_init(value: object) -> CloudInit:
    """The cloud_init section: each part checked as far as the agent can without a YAML parser (seed.py)."""
    where = "cloud_init"
    if not isinstance(value, dict):
        raise invalid_field(where, f"must be an object with any of {', '.join(CLOUD_INIT_FIELDS)}")
    check_fields(value, set(CLOUD_INIT_FIELDS), where)
    if not value:
        raise invalid_field(where, f"a seed needs at least one of {', '.join(CLOUD_INIT_FIELDS)}")
    hostname = value.get("hostname", "")
    if hostname:
        check_hostname(hostname, f"{where}.hostname")
    elif "hostname" in value:
        raise invalid_field(f"{where}.hostname", "must not be empty")
    keys = value.get("ssh_authorized_keys", [])
    if not isinstance(keys, list) or len(keys) > MAX_SSH_KEYS or ("ssh_authorized_keys" in value and not keys):
        raise invalid_field(f"{where}.ssh_authorized_keys", f"must be a list of 1 to {MAX_SSH_KEYS} public keys")
    checked_keys = tuple(check_ssh_key(key, f"{where}.ssh_authorized_keys[{i}]") for i, key in enumerate(keys))
    user = value.get("user", "")
    if "user" in value and (not isinstance(user, str) or not USER_NAME_PATTERN.fullmatch(user)):
        raise invalid_field(f"{where}.user", "must be a user name: lower-case letters, digits, '_', '-' (1-32)")
    texts = {
        name: check_cloud_init_text(value[name], f"{where}.{name}", scripts=name == "vendor_data")
        for name in ("user_data", "vendor_data")
        if name in value
    }
    network = value.get("network_config")
    cloud_init = CloudInit(
        hostname=hostname,
        ssh_authorized_keys=checked_keys,
        user=user,
        user_data=texts.get("user_data", ""),
        network_config="" if network is None else check_network_config(network, f"{where}.network_config"),
        vendor_data=texts.get("vendor_data", ""),
    )
    return cloud_init


def parse_kernel_boot(value: object) -> KernelBoot:
    if not isinstance(value, dict):
        raise invalid("kernel_boot must be an object", "kernel_boot")
    check_fields(value, {"kernel_image", "initrd_image", "cmdline"}, "kernel_boot")
    initrd = value.get("initrd_image", "")
    cmdline = value.get("cmdline", "")
    if not isinstance(cmdline, str) or len(cmdline) > MAX_CMDLINE or "\n" in cmdline or "\0" in cmdline:
        raise invalid(
            f"kernel_boot.cmdline must be one line of at most {MAX_CMDLINE} characters", "kernel_boot.cmdline"
        )
    return KernelBoot(
        kernel_image=check_name(value.get("kernel_image"), "kernel_boot.kernel_image"),
        initrd_image=check_name(initrd, "kernel_boot.initrd_image") if initrd else "",
        cmdline=cmdline,
    )


def guest_spec_from_json(data: dict[str, Any]) -> GuestSpec:
    """Rebuild a stored definition (already checked when it was created)."""
    boot = data.get("kernel_boot")
    return GuestSpec(
        name=data["name"],
        vcpus=data["vcpus"],
        memory_mib=data["memory_mib"],
        # Definitions stored before disks could be removed name no files: theirs are numbered in order.
        disks=tuple(Disk(**{"file": disk_file(index), **disk}) for index, disk in enumerate(data["disks"])),
        nics=nics_from_json(data["nics"]),
        kernel_boot=KernelBoot(**boot) if boot else None,
        autostart=data["autostart"],
        restart=RestartPolicy(data["restart"]),
        # Definitions stored before CPU limits existed have neither field.
        cpu_weight=data.get("cpu_weight", DEFAULT_CPU_WEIGHT),
        cpu_quota_percent=data.get("cpu_quota_percent", 0),
        cloud_init=cloud_init_from_json(data.get("cloud_init")),
        cdrom=data.get("cdrom", ""),
        boot_order=tuple(BootDevice(device) for device in data.get("boot_order", ())),
        display=data.get("display", False),
    )


# What guest.update may change; disks have verbs of their own (disks.py). NICs, the cloud-init
# section (a changed section is a new seed, a new instance-id), the CD-ROM, the boot order and the
# display take effect at the next start.
UPDATABLE_FIELDS = (
    {"vcpus", "memory_mib", "autostart", "restart", "kernel_boot", "nics", "cloud_init"} | CPU_FIELDS | MEDIA_FIELDS
)


def updated_spec(spec: GuestSpec, changes: dict[str, Any]) -> GuestSpec:
    """The definition with `changes` applied, checked as a new definition would be; its disks as they are
    (their files and grown sizes are no create params)."""
    check_fields(changes, UPDATABLE_FIELDS, "update")
    return replace(parse_guest_spec({**spec.to_params(), **changes}), disks=spec.disks)


def nics_from_json(value: int | list[dict[str, Any]]) -> tuple[Nic, ...]:
    # Definitions stored before NICs were objects hold a count of user-mode NICs.
    if isinstance(value, int):
        return tuple(Nic(user=True) for _ in range(value))
    return tuple(Nic(**{**nic, "model": NicModel(nic["model"])}) for nic in value)


def cloud_init_from_json(value: dict[str, Any] | None) -> CloudInit | None:
    if value is None:
        return None
    return CloudInit(**{**value, "ssh_authorized_keys": tuple(value["ssh_authorized_keys"])})

"""Guest definitions as requests give them: checked field by field, unknown fields refused."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

from appliance.agent.errors import AgentError, ErrorCode

# Names become file and unit names: no separators, no dots-only, bounded.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
MAX_VCPUS = 256
MAX_MEMORY_MIB = 4 * 1024 * 1024
MAX_DISK_GIB = 64 * 1024
MAX_DISKS = 16
MAX_NICS = 8
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
    size_gib: int = 0
    base_image: str = ""


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
    nics: int = 0
    kernel_boot: KernelBoot | None = None
    autostart: bool = False
    restart: RestartPolicy = RestartPolicy.NEVER
    # CPU share against other guests, and a hard limit in percent of one CPU (0: none).
    cpu_weight: int = DEFAULT_CPU_WEIGHT
    cpu_quota_percent: int = 0

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
        return params

    def images_used(self) -> set[str]:
        used = {disk.base_image for disk in self.disks if disk.base_image}
        if self.kernel_boot:
            used |= {self.kernel_boot.kernel_image, self.kernel_boot.initrd_image} - {""}
        return used


def invalid(message: str, field: str) -> AgentError:
    return AgentError(ErrorCode.INVALID_PARAMS, message, {"field": field})


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
        {"name", "vcpus", "memory_mib", "disks", "nics", "kernel_boot", "autostart", "restart"} | CPU_FIELDS,
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
    vcpus = check_int(params, "vcpus", 1, MAX_VCPUS, 1)
    weight, quota = parse_cpu_limits(params, vcpus, DEFAULT_CPU_WEIGHT, 0)
    spec = GuestSpec(
        name=check_name(params.get("name")),
        vcpus=vcpus,
        memory_mib=check_int(params, "memory_mib", 16, MAX_MEMORY_MIB),
        disks=disks,
        nics=check_int(params, "nics", 0, MAX_NICS, 0),
        kernel_boot=None if boot is None else parse_kernel_boot(boot),
        autostart=autostart,
        restart=restart,
        cpu_weight=weight,
        cpu_quota_percent=quota,
    )
    if not spec.disks and spec.kernel_boot is None:
        raise invalid("the guest has nothing to boot: give it disks or a kernel_boot", "disks")
    return spec


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
        return Disk(base_image=check_name(value["base_image"], f"{where}.base_image"))
    return Disk(size_gib=check_int(value, "size_gib", 1, MAX_DISK_GIB))


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
        disks=tuple(Disk(**disk) for disk in data["disks"]),
        nics=data["nics"],
        kernel_boot=KernelBoot(**boot) if boot else None,
        autostart=data["autostart"],
        restart=RestartPolicy(data["restart"]),
        # Definitions stored before CPU limits existed have neither field.
        cpu_weight=data.get("cpu_weight", DEFAULT_CPU_WEIGHT),
        cpu_quota_percent=data.get("cpu_quota_percent", 0),
    )


# What guest.update may change; disks and NICs have verbs of their own.
UPDATABLE_FIELDS = {"vcpus", "memory_mib", "autostart", "restart", "kernel_boot"} | CPU_FIELDS


def updated_spec(spec: GuestSpec, changes: dict[str, Any]) -> GuestSpec:
    """The definition with `changes` applied, checked as a new definition would be."""
    check_fields(changes, UPDATABLE_FIELDS, "update")
    return parse_guest_spec({**spec.to_params(), **changes})

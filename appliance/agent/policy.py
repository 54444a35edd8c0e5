"""The host policy: what the node keeps for itself and how far guests may overcommit it.

Create and start are refused when they would break it, with an error that
names the figures. The [policy] keys are declared here once, for both readers
of the table: the spec (appliance.toml, on the build host) and the agent
(/etc/appliance/agent.toml, rendered from the spec, on the node).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from appliance.agent.errors import AgentError, ErrorCode
from appliance.agent.model import GuestSpec

MIB = 1024 * 1024


@dataclass(frozen=True)
class Limit:
    """One [policy] key: a whole or real number within a range."""

    key: str
    default: int | float
    low: int | float
    high: int | float
    whole: bool

    @property
    def allowed(self) -> str:
        return f"a {'whole number' if self.whole else 'number'} from {self.low:g} to {self.high:g}"

    def read(self, value: object) -> int | float | None:
        """The value as the policy holds it, or None when it is not allowed."""
        # TOML booleans are ints to Python; a whole number must not be written 2.0.
        if isinstance(value, bool) or not isinstance(value, int | float) or (self.whole and not isinstance(value, int)):
            return None
        if not self.low <= value <= self.high:
            return None
        return value if self.whole else float(value)


# The [policy] keys (of appliance.toml, and of the agent.toml rendered from it) in the order they are read.
LIMITS = (
    Limit("reserved_memory_mib", 1024, 0, 1 << 22, whole=True),
    Limit("memory_overcommit", 1.0, 0.1, 10, whole=False),
    Limit("cpu_overcommit", 4.0, 0.1, 64, whole=False),
    Limit("max_guests", 64, 1, 4096, whole=True),
    # Disks are thin (qcow2): their sizes may add up to more than the store holds, this many times.
    Limit("disk_overcommit", 1.0, 0.1, 100, whole=False),
)
_DEFAULTS: dict[str, Any] = {limit.key: limit.default for limit in LIMITS}


@dataclass(frozen=True)
class Policy:
    reserved_memory_mib: int = _DEFAULTS["reserved_memory_mib"]
    memory_overcommit: float = _DEFAULTS["memory_overcommit"]
    cpu_overcommit: float = _DEFAULTS["cpu_overcommit"]
    max_guests: int = _DEFAULTS["max_guests"]
    disk_overcommit: float = _DEFAULTS["disk_overcommit"]


@dataclass(frozen=True)
class Refusal:
    """A [policy] value that is not allowed: its key, the value, and what is allowed."""

    key: str
    value: object
    allowed: str


def read_policy(table: Mapping[str, object]) -> tuple[Policy, list[Refusal]]:
    """The policy a [policy] table asks for, and every value refused (a refused or missing key keeps
    its default). Keys that are not policy keys are left to the caller."""
    values: dict[str, Any] = {}
    refusals = []
    for limit in LIMITS:
        if limit.key not in table:
            continue
        value = limit.read(table[limit.key])
        if value is None:
            refusals.append(Refusal(limit.key, table[limit.key], limit.allowed))
        else:
            values[limit.key] = value
    return Policy(**values), refusals


@dataclass(frozen=True)
class Capacity:
    memory_total_bytes: int
    cpus: int
    # The guest store's file system.
    storage_total_bytes: int = 0

    def guest_memory_mib(self, policy: Policy) -> int:
        usable = self.memory_total_bytes // MIB - policy.reserved_memory_mib
        return max(0, int(usable * policy.memory_overcommit))

    def guest_vcpus(self, policy: Policy) -> int:
        return int(self.cpus * policy.cpu_overcommit)


def check_create(policy: Policy, capacity: Capacity, defined: list[GuestSpec], new: GuestSpec) -> None:
    if len(defined) >= policy.max_guests:
        raise AgentError(
            ErrorCode.POLICY_MAX_GUESTS, f"the node already has {len(defined)} guests (max_guests {policy.max_guests})"
        )
    limit = capacity.guest_memory_mib(policy)
    if new.memory_mib > limit:
        raise AgentError(
            ErrorCode.POLICY_MEMORY,
            f"{new.memory_mib} MiB is more than guests may ever use here: {limit} MiB "
            f"({capacity.memory_total_bytes // MIB} MiB total - {policy.reserved_memory_mib} MiB reserved "
            f"for the host, x{policy.memory_overcommit} overcommit)",
        )


def check_start(policy: Policy, capacity: Capacity, running: list[GuestSpec], new: GuestSpec) -> None:
    memory_in_use = sum(spec.memory_mib for spec in running)
    memory_limit = capacity.guest_memory_mib(policy)
    if memory_in_use + new.memory_mib > memory_limit:
        raise AgentError(
            ErrorCode.POLICY_MEMORY,
            f"starting {new.name!r} needs {new.memory_mib} MiB; running guests have {memory_in_use} MiB "
            f"of the {memory_limit} MiB guests may use",
        )
    vcpus_in_use = sum(spec.vcpus for spec in running)
    vcpu_limit = capacity.guest_vcpus(policy)
    if vcpus_in_use + new.vcpus > vcpu_limit:
        raise AgentError(
            ErrorCode.POLICY_CPU,
            f"starting {new.name!r} needs {new.vcpus} vCPUs; running guests have {vcpus_in_use} "
            f"of the {vcpu_limit} vCPUs allowed ({capacity.cpus} CPUs x{policy.cpu_overcommit} overcommit)",
        )


def check_disks(policy: Policy, capacity: Capacity, defined_bytes: int, new_bytes: int, name: str) -> None:
    """The disks of every guest, at their full size, within the store times disk_overcommit."""
    limit = int(capacity.storage_total_bytes * policy.disk_overcommit)
    if defined_bytes + new_bytes > limit:
        gib = 1 << 30
        raise AgentError(
            ErrorCode.POLICY_STORAGE,
            f"{name!r} asks for {new_bytes / gib:.1f} GiB of disks; guests' disks already add up to "
            f"{defined_bytes / gib:.1f} GiB of the {limit / gib:.1f} GiB allowed "
            f"({capacity.storage_total_bytes / gib:.1f} GiB store x{policy.disk_overcommit} disk_overcommit: "
            "disks are thin, raise it in [policy] to provision more than the store holds)",
        )

"""The host policy: what the node keeps for itself and how far guests may overcommit it.

Create and start are refused when they would break it, with an error that
names the figures.
"""

from __future__ import annotations

from dataclasses import dataclass

from appliance.agent.errors import AgentError, ErrorCode
from appliance.agent.model import GuestSpec

MIB = 1024 * 1024


@dataclass(frozen=True)
class Policy:
    reserved_memory_mib: int = 1024
    memory_overcommit: float = 1.0
    cpu_overcommit: float = 4.0
    max_guests: int = 64


@dataclass(frozen=True)
class Capacity:
    memory_total_bytes: int
    cpus: int

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

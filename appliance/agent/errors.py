"""Every error the agent answers with: one enumeration of stable codes, and the one exception type.

Clients match on the code (in the reply's `error.data.code`), never on the
message; the operator's client (appliance.nodes.client) uses this same
enumeration. The JSON-RPC numeric code follows from the code.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any


class ErrorCode(StrEnum):
    # The protocol itself (JSON-RPC 2.0's own errors).
    PARSE_ERROR = "parse_error"
    INVALID_REQUEST = "invalid_request"
    TOO_LARGE = "too_large"
    METHOD_NOT_FOUND = "method_not_found"
    INVALID_PARAMS = "invalid_params"
    INTERNAL_ERROR = "internal_error"
    # Guests.
    GUEST_EXISTS = "guest_exists"
    GUEST_NOT_FOUND = "guest_not_found"
    GUEST_RUNNING = "guest_running"
    GUEST_NOT_RUNNING = "guest_not_running"
    GUEST_BUSY = "guest_busy"
    KEPT_NOT_FOUND = "kept_not_found"
    # Consoles: a second interactive attach, a display asked of a guest that has none.
    CONSOLE_BUSY = "console_busy"
    NO_DISPLAY = "no_display"
    # The image store.
    IMAGE_EXISTS = "image_exists"
    IMAGE_NOT_FOUND = "image_not_found"
    IMAGE_IN_USE = "image_in_use"
    CHECKSUM_MISMATCH = "checksum_mismatch"
    UPLOAD_INCOMPLETE = "upload_incomplete"
    # The host policy.
    POLICY_MAX_GUESTS = "policy_max_guests"
    POLICY_MEMORY = "policy_memory"
    POLICY_CPU = "policy_cpu"
    POLICY_STORAGE = "policy_storage"
    # The node's own life: installs, upgrades, rollbacks (appliance.agent.slots, install).
    NOT_INSTALLED = "not_installed"
    BUILD_REFUSED = "build_refused"
    SLOT_TOO_SMALL = "slot_too_small"
    UPGRADE_CONFLICT = "upgrade_conflict"
    NO_ROLLBACK = "no_rollback"
    NO_SPACE = "no_space"
    GUESTS_RUNNING = "guests_running"
    DISK_REFUSED = "disk_refused"
    HELPER_UNAVAILABLE = "helper_unavailable"
    # What the node could not do.
    QMP_FAILED = "qmp_failed"
    TOOL_FAILED = "tool_failed"
    UNSUPPORTED = "unsupported"
    # Live migration (migration.py): a destination that cannot take the guest as it runs (accelerator,
    # machine type, QEMU, its command line), a migration QEMU gave up on, a step asked of no migration.
    MIGRATION_REFUSED = "migration_refused"
    MIGRATION_FAILED = "migration_failed"
    NOT_MIGRATING = "not_migrating"


# JSON-RPC 2.0 numeric codes; every code not listed is in the server-error range.
APPLICATION_ERROR = -32000
RPC_CODES = {
    ErrorCode.PARSE_ERROR: -32700,
    ErrorCode.INVALID_REQUEST: -32600,
    ErrorCode.TOO_LARGE: -32600,
    ErrorCode.METHOD_NOT_FOUND: -32601,
    ErrorCode.INVALID_PARAMS: -32602,
    ErrorCode.INTERNAL_ERROR: -32603,
}


class AgentError(Exception):
    """A request failed; `code` is the stable name clients match on, `details` go into error.data."""

    def __init__(self, code: ErrorCode, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details or {}

    @property
    def rpc_code(self) -> int:
        return RPC_CODES.get(self.code, APPLICATION_ERROR)


# The errors many methods raise about one named guest or image, worded once.
def guest_exists(name: str) -> AgentError:
    return AgentError(ErrorCode.GUEST_EXISTS, f"a guest named {name!r} already exists")


def guest_not_found(name: str) -> AgentError:
    return AgentError(ErrorCode.GUEST_NOT_FOUND, f"no guest named {name!r}")


def guest_not_running(name: str) -> AgentError:
    return AgentError(ErrorCode.GUEST_NOT_RUNNING, f"guest {name!r} is not running")


def image_exists(name: str) -> AgentError:
    return AgentError(ErrorCode.IMAGE_EXISTS, f"an image named {name!r} already exists")


def image_not_found(name: str) -> AgentError:
    return AgentError(ErrorCode.IMAGE_NOT_FOUND, f"no image named {name!r} in the image store")

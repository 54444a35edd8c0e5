"""What can go wrong talking to nodes, each with the stable `code` that `--json` prints.

Every paramiko and socket error is turned into one of these at the client's
boundary (appliance.nodes.client), so none reaches the CLI as a traceback.
"""

from __future__ import annotations

from typing import Any

from appliance.agent.errors import ErrorCode
from appliance.errors import ApplianceError, UsageError


class NodeError(ApplianceError):
    """Base of every failure talking to a node."""

    code = "node_error"


class AddressError(NodeError, UsageError):
    """A node address (or ~/.ssh/config) that cannot be used."""

    code = "usage"


class KeyFileError(NodeError, UsageError):
    """An operator key that cannot be used: missing, a public key, unreadable, or its passphrase not given."""

    code = "key_file"


class AuthenticationError(NodeError):
    """The node refused every key offered."""

    code = "auth_failed"


class HostKeyError(NodeError):
    """The node's host key is unknown (strict mode) or differs from the one recorded."""

    code = "host_key"


class NodeTimeoutError(NodeError):
    """No answer within the timeout."""

    code = "timeout"


class ConnectionLostError(NodeError):
    """The connection broke while in use."""

    code = "connection_lost"


class UnreachableError(ConnectionLostError):
    """The connection could not be made (refused, reset, dropped before the handshake) after the retries."""

    code = "connection_failed"


class ImageExistsError(NodeError):
    """image push: the node already has an image of that name (checked before uploading)."""

    code = "image_exists"


class AgentCallError(NodeError):
    """The agent answered with an error; `code` is its stable name (ErrorCode, or the string a newer
    agent sent), `details` the rest of its error data."""

    def __init__(self, code: str, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code: ErrorCode | str = ErrorCode(code) if code in ErrorCode.__members__.values() else code
        self.message = message
        self.details = details or {}


class ImageFileError(NodeError, UsageError):
    """image push: the local file cannot be pushed (missing, a directory, unreadable)."""

    code = "usage"


class ImageNameError(NodeError, UsageError):
    """image push: a name the agent would refuse (its rule, checked before uploading)."""

    code = "invalid_params"

"""The modules' way to a node: the project's SSH client (appliance.nodes.client.Node), one connection per task.

Every failure the client raises (network, keys, host key, the agent's own
errors) ends the module with fail_json carrying its stable code, never a
traceback. The options are those of the `appliance.hypervisor.node` doc
fragment; the action plugin fills node_host, node_port and node_user from
the inventory.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ansible.module_utils.basic import AnsibleModule, missing_required_lib

try:
    from appliance.errors import ApplianceError
    from appliance.nodes.client import Node, NodeAddress, check_image_upload, parse_address
    from appliance.nodes.errors import AgentCallError
    from appliance.nodes.keys import Keyring
except ImportError:
    APPLIANCE_IMPORT_ERROR: str | None = traceback.format_exc()
else:
    APPLIANCE_IMPORT_ERROR = None

NODE_OPTIONS: dict[str, dict[str, Any]] = {
    "node_host": {"type": "str"},
    "node_port": {"type": "int"},
    "node_user": {"type": "str"},
    "key_file": {"type": "path"},
    "known_hosts": {"type": "path"},
    "strict_host_key": {"type": "bool", "default": False},
    "node_timeout": {"type": "float", "default": 30.0},
}

# Between two looks at a guest's state while waiting for it.
POLL_SECONDS = 0.5
# A request that waits on the node (a stop's ACPI grace) gets this much beyond its own wait.
LONG_CALL_MARGIN = 30.0


def node_argument_spec(**options: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {**NODE_OPTIONS, **options}


class ModuleFailure(Exception):
    """What the module itself refuses (not the node): a message and a stable code, as the agent's errors have."""

    def __init__(self, code: str, message: str, **details: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details


def node_address(params: dict[str, Any]) -> NodeAddress:
    """The node from the options: node_host looked up in ~/.ssh/config (an IPv6 literal as it is), then the
    port and user given, as `appliance fleet` takes ansible_host, ansible_port and ansible_user."""
    host = params["node_host"]
    if not host:
        raise ModuleFailure(
            "usage",
            "node_host is empty: run the module through its action plugin (it fills node_host from ansible_host "
            "or inventory_hostname) or give node_host",
        )
    base = NodeAddress(host) if ":" in host else parse_address(host)
    return NodeAddress(
        host=base.host,
        port=params["node_port"] or base.port,
        user=params["node_user"] or base.user,
        identity_files=base.identity_files,
        identities_only=base.identities_only,
    )


class NodeSession:
    """One task's connection to one node, opened at the first request and closed by run_module."""

    def __init__(self, params: dict[str, Any]) -> None:
        self.address = node_address(params)
        self.keyring = Keyring(Path(params["key_file"]) if params["key_file"] else None)
        self.known_hosts = Path(params["known_hosts"]) if params["known_hosts"] else None
        self.strict = bool(params["strict_host_key"])
        self.timeout = float(params["node_timeout"])
        self.node = self._node(self.timeout)

    def _node(self, timeout: float) -> Node:
        return self.connector(timeout)(self.address)

    def connector(self, timeout: float) -> Callable[[NodeAddress], Node]:
        """New connections with this session's keys and host keys, each request awaited TIMEOUT seconds at
        most (for the project's functions that open their own: an upgrade reconnects after the reboot)."""
        return lambda address: Node(address, self.keyring, self.known_hosts, self.strict, timeout)

    def call(self, method: str, params: dict[str, Any] | None = None, *, idempotent: bool = False) -> Any:
        return self.node.call(method, params, idempotent=idempotent)

    def call_waiting(self, method: str, params: dict[str, Any], seconds: float) -> Any:
        """A request the agent answers only after waiting up to SECONDS (a guest's ACPI power-down): sent on a
        connection of its own whose request timeout covers that wait, so node_timeout still bounds the rest."""
        if seconds + LONG_CALL_MARGIN <= self.timeout:
            return self.call(method, params)
        with self._node(seconds + LONG_CALL_MARGIN) as node:
            return node.call(method, params)

    @staticmethod
    def check_image_file(path: Path, name: str) -> None:
        """What the client can tell of an image push without the node: a readable file, a name the agent takes."""
        check_image_upload(path, name)

    def push_image(self, path: Path, name: str) -> Any:
        """The file into the node's image store, which checks the sha256 of what it receives. The caller has
        checked the file and seen that the node has no image of that name."""
        return self.node.push_image(path, name, checked=True)

    def guest_info(self, name: str) -> dict[str, Any] | None:
        """guest.info, or None when the node has no such guest."""
        try:
            info: dict[str, Any] = self.call("guest.info", {"name": name}, idempotent=True)
        except AgentCallError as error:
            if error.code == "guest_not_found":
                return None
            raise
        return info

    def wait_for_state(self, name: str, wanted: str, seconds: float) -> dict[str, Any]:
        """guest.info once the guest is in state WANTED; a ModuleFailure (code `timeout`) after SECONDS."""
        deadline = time.monotonic() + seconds
        while True:
            info = self.guest_info(name)
            state = "absent" if info is None else info["state"]
            if state == wanted and info is not None:
                return info
            if time.monotonic() >= deadline:
                raise ModuleFailure("timeout", f"guest {name!r} is {state}, not {wanted}, after {seconds:g}s")
            time.sleep(POLL_SECONDS)

    def close(self) -> None:
        self.node.close()


def run_module(module: AnsibleModule, act: Callable[[NodeSession], dict[str, Any]]) -> None:
    """ACT with a session to the node, then exit_json with what it returns; every failure is fail_json with
    its code (and the agent's error data in `details`)."""
    if APPLIANCE_IMPORT_ERROR is not None:
        module.fail_json(
            msg=missing_required_lib(
                "appliance (this project's Python package, with paramiko)",
                reason="to reach the node's agent; the module runs with the Python that runs ansible-playbook "
                "unless ansible_python_interpreter is set for the host",
            ),
            exception=APPLIANCE_IMPORT_ERROR,
            code="missing_library",
        )
    session: NodeSession | None = None
    try:
        session = NodeSession(module.params)
        result = act(session)
    except ModuleFailure as failure:
        module.fail_json(msg=failure.message, code=failure.code, details=failure.details)
    except AgentCallError as error:
        module.fail_json(msg=str(error), code=str(error.code), details=error.details)
    except ApplianceError as error:
        module.fail_json(msg=str(error), code=str(getattr(error, "code", "error")), details={})
    finally:
        if session is not None:
            session.close()
    module.exit_json(**result)

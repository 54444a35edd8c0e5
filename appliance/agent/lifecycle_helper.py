"""`appliance-agent lifecycle-helper`: the node's few root actions on its own disks, one request per connection.

On the node, systemd listens on /run/appliance/lifecycle-helper.sock (mode
0660, group of the agent user) and starts this as root once per connection,
the connection on stdin (`Accept=yes`), like the tap helper. The agent, which
runs unprivileged, asks it for exactly these, and nothing else reaches root:

  status                    the slots (what each holds, booted, default, the last upgrade)
  prepare {build}           check a new build and make the slot not running ready for it
  stage {file, size_bytes, sha256}, then "ready", then the bytes: one file of it, sha256 checked
  commit                    write the slot and arm one trial boot of it
  rollback                  make the other slot (a build that booted well) the default
  disks                     the node's disks, and which `install` would take
  install {disk, wipe}      write the running build onto a disk (progress lines, then the result)

Every answer is one JSON line: {"result": ...} or {"error": {"code", "message"}};
`install` sends {"progress": "..."} lines before it, `stage` {"ready": true}.
The slot written is always the one not running, the disk installed on never
the one booted from or in use; the paths come from the node's own state,
never from the request.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import traceback
from typing import Any, BinaryIO

from appliance.agent import install, slots
from appliance.agent.errors import AgentError, ErrorCode
from appliance.agent.lifecycle_config import LifecycleConfig

REQUEST_LIMIT = 64 * 1024
OPS = ("status", "prepare", "stage", "commit", "rollback", "disks", "install")


def field(request: dict[str, Any], name: str, kind: type, default: Any = None) -> Any:
    value = request.get(name, default)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise AgentError(ErrorCode.INVALID_PARAMS, f"{name} must be a {kind.__name__}", {"field": name})
    return value


def node_status(config: LifecycleConfig) -> dict[str, Any]:
    try:
        host = slots.open_host(config)
    except AgentError as error:
        if error.code != ErrorCode.NOT_INSTALLED:
            raise
        return {"installed": False, "reason": error.message}
    return {"installed": True, **slots.status(host)}


def handle(request: dict[str, Any], config: LifecycleConfig, reader: BinaryIO, send: Any) -> Any:
    op = request.get("op")
    if op not in OPS:
        raise AgentError(ErrorCode.METHOD_NOT_FOUND, f"the lifecycle helper does no {op!r} (it does {', '.join(OPS)})")
    if op == "status":
        return node_status(config)
    if op == "disks":
        return install.list_disks()
    if op == "install":
        disk = field(request, "disk", str)
        wipe = field(request, "wipe", bool, False)
        if disk == "first-blank":
            disk = install.first_blank_disk()
        return install.install(config, disk, wipe, lambda text: send({"progress": text}))
    host = slots.open_host(config)
    if op == "prepare":
        refuse = field(request, "refuse_guests", list, [])
        return slots.prepare(host, request.get("build"), [str(name) for name in refuse])
    if op == "stage":
        file = field(request, "file", str)
        size = field(request, "size_bytes", int)
        sha256 = field(request, "sha256", str)
        slots.staged_plan(host)
        send({"ready": True})
        return slots.stage(host, file, size, sha256, reader)
    if op == "commit":
        return slots.commit(host)
    return slots.rollback(host)


def serve_request(connection: socket.socket, config: LifecycleConfig) -> None:
    reader = connection.makefile("rb")

    def send(message: dict[str, Any]) -> None:
        connection.sendall(json.dumps(message, sort_keys=True).encode() + b"\n")

    line = reader.readline(REQUEST_LIMIT)
    try:
        try:
            request = json.loads(line)
        except ValueError as error:
            raise AgentError(ErrorCode.PARSE_ERROR, "the request is not JSON") from error
        if not isinstance(request, dict):
            raise AgentError(ErrorCode.INVALID_REQUEST, "the request must be a JSON object")
        result = handle(request, config, reader, send)
        send({"result": result})
    except AgentError as error:
        print(f"lifecycle-helper: {request_name(line)}: {error.code}: {error.message}", file=sys.stderr)
        send({"error": {"code": error.code, "message": error.message}})
    except Exception as error:
        # A bug must still answer: the agent is waiting. The traceback goes to the journal.
        traceback.print_exc(file=sys.stderr)
        send({"error": {"code": ErrorCode.INTERNAL_ERROR, "message": f"{type(error).__name__}: {error}"}})


def request_name(line: bytes) -> str:
    try:
        return str(json.loads(line).get("op"))
    except (ValueError, AttributeError):
        return "?"


def main(config: LifecycleConfig) -> int:
    """The connection is stdin, as systemd's socket activation gives it."""
    with socket.socket(fileno=os.dup(0)) as connection:
        try:
            serve_request(connection, config)
        except (BrokenPipeError, ConnectionResetError):
            print("lifecycle-helper: the agent hung up", file=sys.stderr)
            return 1
    return 0

"""The agent's side of the node's life: upgrades, rollback, install, asked of the root lifecycle helper.

The agent runs unprivileged; everything that writes a slot, grubenv or a disk
is done by the helper (appliance.agent.lifecycle_helper), reached over its
socket. An upgrade's files stream from the operator's connection through the
agent into the helper, which checks each file's sha256 against the new build's
manifest as it writes. Guests: an upgrade or install is refused while guests
run, unless the operator says to stop them (the client then stops them, after
the slot is written, and autostart guests come back after the reboot).
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from appliance.agent.disklayout import LIVE_FILES
from appliance.agent.errors import AgentError, ErrorCode
from appliance.agent.lifecycle_config import LifecycleConfig
from appliance.agent.model import check_fields, check_int
from appliance.agent.slots import SHA256

CHUNK = 1 << 20
MAX_UPLOAD_BYTES = 1 << 40
# A helper that answers nothing for this long has hung: an install's longest step is well inside it.
HELPER_TIMEOUT = 1800.0
WATCHDOG = Path("/sys/class/watchdog/watchdog0")

Progress = Callable[[str], None]


class Helper:
    """One request to the root lifecycle helper over its socket."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def connect(self) -> socket.socket:
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        connection.settimeout(HELPER_TIMEOUT)
        try:
            connection.connect(str(self.path))
        except OSError as error:
            connection.close()
            raise AgentError(
                ErrorCode.HELPER_UNAVAILABLE,
                f"the node's lifecycle helper does not answer at {self.path} ({error.strerror or error}): "
                "this node cannot install or upgrade itself",
            ) from error
        return connection

    def call(self, op: str, params: dict[str, Any] | None = None, progress: Progress | None = None) -> Any:
        with self.connect() as connection:
            connection.sendall(json.dumps({"op": op, **(params or {})}).encode() + b"\n")
            return answer(connection.makefile("rb"), progress)

    def stage(self, params: dict[str, Any], size: int, data: BinaryIO) -> Any:
        """Send one file's SIZE bytes from DATA; they are read from DATA whatever happens, so the
        operator's connection stays in step even when the helper refuses them."""
        left = size
        try:
            with self.connect() as connection:
                connection.sendall(json.dumps({"op": "stage", **params}).encode() + b"\n")
                replies = connection.makefile("rb")
                first = read_reply(replies)
                if "ready" not in first:
                    return result_of(first)
                while left > 0:
                    chunk = data.read(min(CHUNK, left))
                    if not chunk:
                        break
                    left -= len(chunk)
                    connection.sendall(chunk)
                connection.shutdown(socket.SHUT_WR)
                return answer(replies, None)
        finally:
            skip(data, left)


def read_reply(replies: BinaryIO) -> dict[str, Any]:
    line = replies.readline()
    if not line:
        raise AgentError(ErrorCode.TOOL_FAILED, "the lifecycle helper ended without an answer (see its journal)")
    reply: dict[str, Any] = json.loads(line)
    return reply


def result_of(reply: dict[str, Any]) -> Any:
    if "error" in reply:
        error = reply["error"]
        code = error.get("code")
        known = code if code in ErrorCode.__members__.values() else ErrorCode.TOOL_FAILED
        raise AgentError(ErrorCode(known), str(error.get("message")))
    return reply.get("result")


def answer(replies: BinaryIO, progress: Progress | None) -> Any:
    while True:
        reply = read_reply(replies)
        if "progress" in reply:
            if progress:
                progress(str(reply["progress"]))
            continue
        return result_of(reply)


def skip(stream: BinaryIO, count: int) -> None:
    while count > 0:
        chunk = stream.read(min(CHUNK, count))
        if not chunk:
            return
        count -= len(chunk)


def running_guests(list_guests: Callable[[], list[dict[str, Any]]]) -> list[str]:
    return [guest["name"] for guest in list_guests() if guest.get("state") != "stopped"]


def refuse_running_guests(names: list[str], what: str, flag: str) -> None:
    if names:
        hint = f" (or give {flag})" if flag else ""
        raise AgentError(
            ErrorCode.GUESTS_RUNNING,
            f"{what} refused while guests run: {', '.join(names)}; stop them first{hint}",
            {"guests": names},
        )


def prepare(config: LifecycleConfig, params: dict[str, Any], guests: list[str]) -> Any:
    check_fields(params, {"build", "stop_guests"}, "params")
    stop = params.get("stop_guests", False)
    if not isinstance(stop, bool):
        raise AgentError(ErrorCode.INVALID_PARAMS, "stop_guests must be true or false", {"field": "stop_guests"})
    # The node refuses after its no-op checks and before it writes anything: the build it runs is a
    # no-op with guests running too.
    refused = [] if stop else guests
    result = Helper(config.helper_socket).call("prepare", {"build": params.get("build"), "refuse_guests": refused})
    return {**result, "running_guests": guests}


def send_file(config: LifecycleConfig, params: dict[str, Any], data: BinaryIO) -> Any:
    """upgrade.send: the request line is followed by exactly size_bytes of the file."""
    try:
        size = check_int(params, "size_bytes", 0, MAX_UPLOAD_BYTES)
    except AgentError as error:
        # Without a size the data that follows cannot be skipped: end the connection.
        error.details["close"] = True
        raise
    try:
        check_fields(params, {"file", "size_bytes", "sha256"}, "params")
        if params.get("file") not in LIVE_FILES:
            raise AgentError(
                ErrorCode.INVALID_PARAMS, f"file must be one of {', '.join(LIVE_FILES)}", {"field": "file"}
            )
        if not isinstance(params.get("sha256"), str) or not SHA256.fullmatch(params["sha256"]):
            raise AgentError(ErrorCode.INVALID_PARAMS, "sha256 must be 64 lower-case hex digits", {"field": "sha256"})
    except AgentError:
        skip(data, size)
        raise
    return Helper(config.helper_socket).stage(params, size, data)


def lifecycle_report(config: LifecycleConfig) -> dict[str, Any]:
    """host.report's `lifecycle`: the slots as the node last published them, the watchdog, the first boot."""

    def read(path: Path) -> Any:
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    return {"slots": read(config.status_file), "firstboot": read(config.firstboot_file), "watchdog": watchdog()}


def watchdog(device: Path = WATCHDOG) -> dict[str, Any] | None:
    """The hardware watchdog systemd keeps (RuntimeWatchdogSec): None when the node has none."""
    if not device.is_dir():
        return None

    def value(name: str) -> str:
        try:
            return (device / name).read_text().strip()
        except OSError:
            return ""

    timeout = value("timeout")
    return {
        "identity": value("identity"),
        "state": value("state"),
        "timeout_seconds": int(timeout) if timeout.isdigit() else None,
    }

"""`appliance-agent serve`: answers requests on stdin/stdout, one per line, until EOF.

This is the command SSH forces for operator keys, so the method table below is
everything an operator can reach.
"""

from __future__ import annotations

import re
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from appliance.agent import (
    __version__,
    arriving,
    consoles,
    disks,
    guests,
    images,
    kept,
    leaving,
    migration,
    node,
    streams,
    upgrade,
)
from appliance.agent.errors import AgentError, ErrorCode
from appliance.agent.host import collect_report
from appliance.agent.lifecycle_config import LifecycleConfig, LifecycleConfigError, load_lifecycle_config
from appliance.agent.model import (
    CPU_FIELDS,
    MAX_DISK_GIB,
    check_fields,
    check_int,
    check_name,
    parse_guest_spec,
)
from appliance.agent.protocol import (
    PROTOCOL_VERSION,
    RELAY_METHODS,
    Handover,
    announced_relay,
    announced_upload,
    error_message,
    notification_message,
    parse_request,
    read_line,
    result_message,
)
from appliance.agent.repair import repair
from appliance.agent.store import Store


class ServerContext:
    """What one connection's requests share; the store opens on first use."""

    def __init__(self, hypervisor: guests.Hypervisor, build_info_path: Path) -> None:
        self.state_dir = hypervisor.state_dir
        self.build_info_path = build_info_path
        self.host = hypervisor
        self._store: Store | None = None
        # The request stream, for methods whose request line is followed by raw data.
        self.requests: BinaryIO | None = None
        # Guests this connection is moving, held across its requests until it ends.
        self.migrations = migration.Sessions()
        # The reply stream, for methods that send progress notifications before their answer.
        self.replies: BinaryIO | None = None

    def notify(self, text: str) -> None:
        """A JSON-RPC notification (no id) ahead of the answer: `progress` with a line of text."""
        if self.replies is not None:
            self.replies.write(notification_message("progress", {"text": text}))
            self.replies.flush()

    @property
    def lifecycle(self) -> LifecycleConfig:
        try:
            return load_lifecycle_config()
        except LifecycleConfigError as error:
            raise AgentError(ErrorCode.INTERNAL_ERROR, str(error)) from error

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = Store(self.state_dir)
            repair(self.host, self._store)
        return self._store

    def close(self) -> None:
        """The connection ended, however: what it held goes (an arriving guest not yet taken, ...)."""
        self.migrations.close(self.host)


Method = Callable[[ServerContext, dict[str, Any]], Any]


def no_params(params: dict[str, Any]) -> None:
    if params:
        raise AgentError(ErrorCode.INVALID_PARAMS, f"this method takes no params (got {', '.join(sorted(params))})")


def agent_hello(context: ServerContext, params: dict[str, Any]) -> dict[str, Any]:
    no_params(params)
    return {"protocol": PROTOCOL_VERSION, "agent_version": __version__, "methods": sorted(METHODS)}


def host_report(context: ServerContext, params: dict[str, Any]) -> dict[str, object]:
    no_params(params)
    report = collect_report(context.build_info_path)
    # One answer about KVM: /dev/kvm answering its API is not enough, guests get it only
    # when a probe guest ran under it (the accelerator in the report says why not).
    accel = context.host.accel
    kvm = {
        "present": report.kvm.present,
        "usable": accel.accel == "kvm",
        "detail": report.kvm.detail if accel.accel == "kvm" else accel.reason,
    }
    return {
        **report.to_json(),
        "kvm": kvm,
        **guests.resources_report(context.host, context.store),
        **upgrade.lifecycle_report(context.lifecycle),
    }


def guest_name(params: dict[str, Any], extra: set[str] | None = None) -> str:
    check_fields(params, {"name"} | (extra or set()), "params")
    return check_name(params.get("name"))


def flag(params: dict[str, Any], field: str) -> bool:
    value = params.get(field, False)
    if not isinstance(value, bool):
        raise AgentError(ErrorCode.INVALID_PARAMS, f"{field} must be true or false", {"field": field})
    return value


def guest_create(context: ServerContext, params: dict[str, Any]) -> Any:
    return guests.create_guest(context.host, context.store, parse_guest_spec(params))


def guest_start(context: ServerContext, params: dict[str, Any]) -> Any:
    return guests.start_guest(context.host, context.store, guest_name(params))


def guest_stop(context: ServerContext, params: dict[str, Any]) -> Any:
    name = guest_name(params, {"timeout"})
    return guests.stop_guest(context.host, context.store, name, check_int(params, "timeout", 0, 3600, 60))


def guest_set_memory(context: ServerContext, params: dict[str, Any]) -> Any:
    name = guest_name(params, {"memory_mib"})
    return guests.set_memory(context.host, context.store, name, check_int(params, "memory_mib", 16, 4 * 1024 * 1024))


def guest_set_cpu(context: ServerContext, params: dict[str, Any]) -> Any:
    name = guest_name(params, CPU_FIELDS)
    return guests.set_cpu(context.host, context.store, name, params)


def guest_reboot(context: ServerContext, params: dict[str, Any]) -> Any:
    name = guest_name(params, {"mode", "timeout"})
    mode = params.get("mode", "reset")
    if mode not in REBOOT_MODES:
        raise AgentError(ErrorCode.INVALID_PARAMS, f"mode must be one of {', '.join(REBOOT_MODES)}", {"field": "mode"})
    timeout = check_int(params, "timeout", 0, 3600, 60)
    return guests.reboot_guest(context.host, context.store, name, mode, timeout)


# "reset" first: what guest.reboot always did, for clients that do not say.
REBOOT_MODES = ("reset", "acpi")


def guest_update(context: ServerContext, params: dict[str, Any]) -> Any:
    name = check_name(params.get("name"))
    changes = {key: value for key, value in params.items() if key != "name"}
    return guests.update_guest(context.host, context.store, name, changes)


def kept_list(context: ServerContext, params: dict[str, Any]) -> Any:
    no_params(params)
    return kept.list_kept(context.host)


def kept_restore(context: ServerContext, params: dict[str, Any]) -> Any:
    check_fields(params, {"kept", "name"}, "params")
    name = params.get("name")
    return kept.restore(context.host, context.store, params.get("kept"), None if name is None else check_name(name))


def kept_purge(context: ServerContext, params: dict[str, Any]) -> Any:
    check_fields(params, {"kept"}, "params")
    return kept.purge(context.host, params.get("kept"))


def node_power(action: str) -> Method:
    def method(context: ServerContext, params: dict[str, Any]) -> Any:
        no_params(params)
        return node.power(action)

    return method


UNIT_PATTERN = re.compile(r"[A-Za-z0-9@_.:\\-]{1,255}")


def node_logs(context: ServerContext, params: dict[str, Any]) -> Any:
    check_fields(params, {"lines", "unit", "boot"}, "params")
    unit = params.get("unit", "")
    if not isinstance(unit, str) or (unit and not UNIT_PATTERN.fullmatch(unit)):
        raise AgentError(ErrorCode.INVALID_PARAMS, "unit must be a systemd unit name", {"field": "unit"})
    lines = check_int(params, "lines", 1, node.MAX_LOG_LINES, 200)
    boot = check_int(params, "boot", -100, 0, 0)
    return node.journal(lines, unit, boot)


def guest_kill(context: ServerContext, params: dict[str, Any]) -> Any:
    return guests.kill_guest(context.host, context.store, guest_name(params))


def qmp_verb(command: str) -> Method:
    def method(context: ServerContext, params: dict[str, Any]) -> Any:
        return guests.guest_command(context.host, context.store, guest_name(params), command)

    return method


def guest_delete(context: ServerContext, params: dict[str, Any]) -> Any:
    name = guest_name(params, {"force", "remove_disks"})
    return guests.delete_guest(context.host, context.store, name, flag(params, "force"), flag(params, "remove_disks"))


def guest_list(context: ServerContext, params: dict[str, Any]) -> Any:
    no_params(params)
    return guests.list_guests(context.host, context.store)


def guest_info(context: ServerContext, params: dict[str, Any]) -> Any:
    return guests.guest_info(context.host, context.store, guest_name(params))


def guest_console(context: ServerContext, params: dict[str, Any]) -> Any:
    name = guest_name(params, {"max_bytes"})
    limit = check_int(params, "max_bytes", 1, guests.CONSOLE_TAIL_MAX, 4096)
    return guests.console_tail(context.host, context.store, name, limit)


def guest_console_attach(context: ServerContext, params: dict[str, Any]) -> Any:
    """The serial console, interactive: after the reply line, raw bytes both ways (protocol.py)."""
    return consoles.console_attach(context.host, context.store, guest_name(params))


def guest_display_attach(context: ServerContext, params: dict[str, Any]) -> Any:
    """One VNC connection to the guest's display: after the reply line, raw bytes both ways."""
    return consoles.display_attach(context.host, context.store, guest_name(params))


def guest_disk_add(context: ServerContext, params: dict[str, Any]) -> Any:
    name = guest_name(params, {"size_gib"})
    return disks.add_disk(context.host, context.store, name, check_int(params, "size_gib", 1, MAX_DISK_GIB))


def guest_disk_grow(context: ServerContext, params: dict[str, Any]) -> Any:
    name = guest_name(params, {"index", "size_gib"})
    size = check_int(params, "size_gib", 1, MAX_DISK_GIB)
    return disks.grow_disk(context.host, context.store, name, params.get("index"), size)


def guest_disk_remove(context: ServerContext, params: dict[str, Any]) -> Any:
    name = guest_name(params, {"index"})
    return disks.remove_disk(context.host, context.store, name, params.get("index"))


def image_import(context: ServerContext, params: dict[str, Any]) -> Any:
    """The request line is followed by exactly size_bytes of raw image data."""
    assert context.requests is not None
    try:
        size = check_int(params, "size_bytes", 0, images.MAX_IMAGE_BYTES)
    except AgentError as error:
        # Without a size the data that follows cannot be skipped: end the connection.
        error.details["close"] = True
        raise
    try:
        check_fields(params, {"name", "size_bytes", "sha256"}, "params")
        name = check_name(params.get("name"))
        sha256 = params.get("sha256")
        if not isinstance(sha256, str) or not images.SHA256_PATTERN.fullmatch(sha256):
            raise AgentError(ErrorCode.INVALID_PARAMS, "sha256 must be 64 lower-case hex digits")
    except AgentError:
        skip_bytes(context.requests, size)
        raise
    return images.receive_image(context.host, context.store, name, size, sha256, context.requests)


def skip_bytes(stream: BinaryIO, count: int) -> None:
    while count > 0:
        chunk = stream.read(min(images.CHUNK, count))
        if not chunk:
            return
        count -= len(chunk)


def running_guests(context: ServerContext) -> list[str]:
    return upgrade.running_guests(lambda: guests.list_guests(context.host, context.store))


def upgrade_prepare(context: ServerContext, params: dict[str, Any]) -> Any:
    return upgrade.prepare(context.lifecycle, params, running_guests(context))


def upgrade_send(context: ServerContext, params: dict[str, Any]) -> Any:
    """The request line is followed by exactly size_bytes of one of the new build's files."""
    assert context.requests is not None
    return upgrade.send_file(context.lifecycle, params, context.requests)


def upgrade_commit(context: ServerContext, params: dict[str, Any]) -> Any:
    no_params(params)
    return upgrade.Helper(context.lifecycle.helper_socket).call("commit")


def upgrade_rollback(context: ServerContext, params: dict[str, Any]) -> Any:
    no_params(params)
    return upgrade.Helper(context.lifecycle.helper_socket).call("rollback")


def node_disks(context: ServerContext, params: dict[str, Any]) -> Any:
    no_params(params)
    return upgrade.Helper(context.lifecycle.helper_socket).call("disks")


def node_install(context: ServerContext, params: dict[str, Any]) -> Any:
    check_fields(params, {"disk", "wipe"}, "params")
    disk = params.get("disk")
    if not isinstance(disk, str) or not disk.startswith("/dev/"):
        raise AgentError(ErrorCode.INVALID_PARAMS, "disk must be a device such as /dev/sda", {"field": "disk"})
    upgrade.refuse_running_guests(running_guests(context), "an install", "")
    helper = upgrade.Helper(context.lifecycle.helper_socket)
    return helper.call("install", {"disk": disk, "wipe": flag(params, "wipe")}, context.notify)


def image_list(context: ServerContext, params: dict[str, Any]) -> Any:
    no_params(params)
    return images.list_images(context.host, context.store)


def image_delete(context: ServerContext, params: dict[str, Any]) -> Any:
    return images.delete_image(context.host, context.store, guest_name(params))


def migration_method(method: migration.Method) -> Method:
    def call(context: ServerContext, params: dict[str, Any]) -> Any:
        return method(context.host, context.store, context.migrations, params)

    return call


METHODS: dict[str, Method] = {
    "image.import": image_import,
    "image.list": image_list,
    "image.delete": image_delete,
    "agent.hello": agent_hello,
    "host.report": host_report,
    "guest.create": guest_create,
    "guest.start": guest_start,
    "guest.stop": guest_stop,
    "guest.kill": guest_kill,
    "guest.reboot": guest_reboot,
    "guest.update": guest_update,
    "kept.list": kept_list,
    "kept.restore": kept_restore,
    "kept.purge": kept_purge,
    "node.reboot": node_power("reboot"),
    "node.shutdown": node_power("shutdown"),
    "node.logs": node_logs,
    "node.disks": node_disks,
    "node.install": node_install,
    "upgrade.prepare": upgrade_prepare,
    "upgrade.send": upgrade_send,
    "upgrade.commit": upgrade_commit,
    "upgrade.rollback": upgrade_rollback,
    "guest.pause": qmp_verb("stop"),
    "guest.resume": qmp_verb("cont"),
    "guest.delete": guest_delete,
    "guest.list": guest_list,
    "guest.info": guest_info,
    "guest.console": guest_console,
    "guest.console_attach": guest_console_attach,
    "guest.display_attach": guest_display_attach,
    "guest.disk_add": guest_disk_add,
    "guest.disk_grow": guest_disk_grow,
    "guest.disk_remove": guest_disk_remove,
    "guest.set_memory": guest_set_memory,
    "guest.set_cpu": guest_set_cpu,
    **{
        name: migration_method(method)
        for name, method in {**leaving.METHODS, **arriving.METHODS, **streams.METHODS}.items()
    },
}


@dataclass(frozen=True)
class Outcome:
    """What one request line comes to: the reply, whether the connection ends after it, and the
    relay that takes the connection over after it (which ends it too)."""

    reply: bytes
    close: bool = False
    handover: Handover | None = None


def handle_line(context: ServerContext, line: bytes) -> Outcome:
    try:
        request = parse_request(line)
    except AgentError as error:
        close = refuse_upload(context, line) or announced_relay(line)
        return Outcome(error_message(error.details.get("id"), error), close)
    request_id = request.id
    relay = request.method in RELAY_METHODS
    try:
        method = METHODS.get(request.method)
        if method is None:
            raise AgentError(ErrorCode.METHOD_NOT_FOUND, f"unknown method {request.method!r}")
        result = method(context, request.params)
        if isinstance(result, Handover):
            return Outcome(result_message(request_id, result.result), handover=result)
        return Outcome(result_message(request_id, result))
    except AgentError as error:
        close = bool(error.details.get("close")) or relay
        return Outcome(error_message(error.details.get("id", request_id), error), close)
    except Exception as error:
        # A bug in one method must not end the operator's connection. The
        # traceback goes to stderr (the journal on the node), the reply names
        # the exception, so the cause is not hidden from either.
        traceback.print_exc(file=sys.stderr)
        failure = AgentError(ErrorCode.INTERNAL_ERROR, f"{type(error).__name__}: {error}")
        return Outcome(error_message(request_id, failure), relay)


def refuse_upload(context: ServerContext, line: bytes) -> bool:
    """After a refused request line: skip the raw data it announced, if any; True when the
    connection must end because how much data follows cannot be known."""
    is_upload, size = announced_upload(line)
    if not is_upload:
        return False
    if size is None or context.requests is None or size > images.MAX_IMAGE_BYTES:
        return True
    skip_bytes(context.requests, size)
    return False


def serve(context: ServerContext, requests: BinaryIO, replies: BinaryIO) -> None:
    try:
        serve_requests(context, requests, replies)
    finally:
        context.close()


def serve_requests(context: ServerContext, requests: BinaryIO, replies: BinaryIO) -> None:
    context.requests = requests
    context.replies = replies
    while True:
        try:
            line = read_line(requests)
        except AgentError as error:
            replies.write(error_message(None, error))
            replies.flush()
            continue
        if line is None:
            return
        if not line.strip():
            continue
        outcome = handle_line(context, line)
        replies.write(outcome.reply)
        replies.flush()
        if outcome.handover is not None:
            # From here on the connection is the relay's: nothing more is read as a request.
            outcome.handover.relay(requests, replies)
            return
        if outcome.close:
            return

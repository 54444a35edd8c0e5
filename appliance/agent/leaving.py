"""A guest leaving this node by migration (migration.py says how a guest moves, and why in this order).

The guest is described as it runs and locked against every other change
(source_begin); its disks are mirrored into the destination's NBD exports and,
once they are in step, its memory migrated (source_start); a thread of this
agent follows QEMU from then on (watch), so the memory starts and the
switch-over is done the moment QEMU is ready for them. The guest is removed only
once the destination has taken it (source_finish); otherwise it stays and runs
on (source_abort, or the end of the connection that began it).
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from appliance.agent.disks import running_size
from appliance.agent.errors import AgentError, ErrorCode
from appliance.agent.guests import Hypervisor, delete_locked, drive_id, image_info, operation, qemu_argv, qmp
from appliance.agent.host import read_cpu_model
from appliance.agent.migration import (
    JOB_PREFIX,
    MEMORY,
    POLL_SECONDS,
    TLS_OBJECT,
    Direct,
    Method,
    Sessions,
    comparable_argv,
    drop_tls,
    failed,
    first_difference,
    flag,
    job_name,
    load_tls,
    name_of,
    outgoing_socket,
    parse_direct,
    refused,
    running_argv,
    tcp_uri,
)
from appliance.agent.model import GuestSpec, check_int
from appliance.agent.qemu import qmp_session, running_pid
from appliance.agent.qmp import QMPClient, QMPError
from appliance.agent.store import Store
from appliance.agent.supervisors import GuestFiles

# Bounds on one status call's wait, and on the mirrors ending in step at the switch-over (they are in
# step already: a few seconds is plenty).
MAX_STATUS_WAIT = 5
SWITCHOVER_WAIT = 60.0
# How long the watcher holds the monitor at a time (another agent asking about the guest waits at most so).
WATCH_SECONDS = 0.5
# QEMU's migration states in which it is still moving (query-migrate's status).
ACTIVE = {"setup", "active", "pre-switchover", "device", "cancelling", "wait-unplug", "postcopy-active",
          "postcopy-paused", "postcopy-recover"}  # fmt: skip


@dataclass
class Leaving:
    """A guest this connection is moving away; its operation lock is held until it is gone or stays."""

    name: str
    live: bool
    # Each disk's drive and how it is mirrored: "top" (only the guest's own layer, over a base image the
    # destination has too) or "full".
    mirrors: dict[str, str]
    lock: contextlib.ExitStack
    started: bool = False
    # Where QEMU sends the memory: the memory stream's relay socket, or the destination's port (--direct).
    memory_uri: str = ""
    memory_started: bool = False
    switched: bool = False
    # The thread that follows QEMU once the migration has started (watch), and what it last saw.
    watcher: threading.Thread | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    changed: threading.Condition = field(default_factory=threading.Condition)
    snapshot: dict[str, Any] = field(default_factory=dict)
    error: AgentError | None = None

    def end(self, host: Hypervisor) -> None:
        """The connection that began it ended: the guest stays here (Sessions says how)."""
        self.stop_watching()
        with self.lock:
            try:
                stay(host, self.name, resume=False)
            except AgentError as error:  # the connection is gone: the node's journal is who hears of it
                print(f"migration: {self.name}: left as it was: {error}", file=sys.stderr)

    def stop_watching(self) -> None:
        """The watcher ended (before anything else asks QEMU to do something about this migration)."""
        self.stop.set()
        if self.watcher is not None:
            self.watcher.join(timeout=SWITCHOVER_WAIT)


def source_begin(host: Hypervisor, store: Store, sessions: Sessions, name: str) -> dict[str, Any]:
    """The guest as it is and runs, for the destination to check and make; the guest is locked against
    every other change until it is gone (source_finish) or stays (source_abort, or the connection's end)."""
    if name in sessions.leaving:
        raise AgentError(ErrorCode.GUEST_BUSY, f"guest {name!r} is leaving through this connection already")
    lock = contextlib.ExitStack()
    lock.enter_context(operation(host, name))
    try:
        departure = describe(host, store, name)
    except BaseException:
        lock.close()
        raise
    live = departure["state"] != "stopped"
    spec = store.guest(name)
    mirrors = {drive_id(disk): "top" if disk.base_image else "full" for disk in spec.disks} if live else {}
    sessions.leaving[name] = Leaving(name, live, mirrors, lock)
    return departure


def describe(host: Hypervisor, store: Store, name: str) -> dict[str, Any]:
    spec = store.guest(name)
    paths = host.paths(name)
    rows = {str(image["name"]): str(image["sha256"]) for image in store.images()}
    departure: dict[str, Any] = {
        "definition": spec.to_json(),
        "images": {image: rows.get(image, "") for image in sorted(spec.images_used())},
        "state": "stopped",
    }
    pid = running_pid(paths)
    if pid is None:
        sizes = {drive_id(disk): int(image_info(paths.disk(disk))["virtual-size"]) for disk in spec.disks}
        departure["disks"] = disk_sizes(spec, sizes)
        return departure
    # The running QEMU must be the machine the destination will build from the definition.
    running = comparable_argv(running_argv(pid), paths.directory, host.images_dir)
    defined = comparable_argv(qemu_argv(host, spec, paths), paths.directory, host.images_dir)
    if running != defined:
        raise refused(
            f"guest {name!r} runs with an older definition than it has now (changed by guest.update, or a disk "
            "added since it started): restart it to migrate it running, or stop it to migrate it stopped "
            f"({first_difference(defined, running, 'by its definition', 'running')})"
        )
    with qmp(host, name) as client:
        state = str(client.execute("query-status")["status"])
        machine = str(client.execute("qom-get", {"path": "/machine", "property": "type"})).removesuffix("-machine")
        version = client.version.get("qemu", {})
        sizes = {drive_id(disk): running_size(client, drive_id(disk))[0] for disk in spec.disks}
    if state not in ("running", "paused"):
        raise refused(f"guest {name!r} is {state}, neither running nor paused: it cannot be migrated as it is")
    departure.update(
        state=state,
        accel=host.accel.accel,
        cpu_model=read_cpu_model(),
        machine=machine,
        qemu_version=[version.get("major", 0), version.get("minor", 0), version.get("micro", 0)],
        qemu_argv=running,
        disks=disk_sizes(spec, sizes),
    )
    return departure


def disk_sizes(spec: GuestSpec, sizes: dict[str, int]) -> list[dict[str, Any]]:
    return [{"file": disk.file, "drive": drive_id(disk), "virtual_size": sizes[drive_id(disk)]} for disk in spec.disks]


def source_start(
    host: Hypervisor, sessions: Sessions, name: str, bandwidth_mib: int, direct: Direct | None
) -> dict[str, Any]:
    """Every disk mirrored into the destination's NBD export, through its stream's relay (which must be
    listening: the client opens the streams first), or straight to the destination over TLS (`direct`);
    the memory follows the same way once the mirrors are in step."""
    session = sessions.leaving_guest(name)
    if not session.live or session.started:
        raise AgentError(ErrorCode.NOT_MIGRATING, f"guest {name!r}: nothing to start (stopped, or started already)")
    paths = host.paths(name)
    speed = bandwidth_mib * 1024 * 1024
    with qmp(host, name) as client:
        try:
            client.execute("migrate-set-capabilities",
                           {"capabilities": [{"capability": "pause-before-switchover", "state": True}]})  # fmt: skip
            if speed:
                client.execute("migrate-set-parameters", {"max-bandwidth": speed})
            tls: dict[str, str] = {}
            if direct:
                load_tls(client, paths.directory, direct.tls, "client")
                client.execute("migrate-set-parameters", {"tls-creds": TLS_OBJECT})
                tls = {"tls-creds": TLS_OBJECT}
                session.memory_uri = tcp_uri(direct.address, direct.ports["memory"])
            else:
                session.memory_uri = f"unix:{outgoing_socket(paths, MEMORY)}"
            for drive, sync in session.mirrors.items():
                target = job_name(drive)
                server: dict[str, Any] = {"type": "unix", "path": str(outgoing_socket(paths, drive))}
                if direct:
                    server = {"type": "inet", "host": direct.address, "port": str(direct.ports["nbd"])}
                client.execute("blockdev-add", {"driver": "nbd", "node-name": target, "export": drive,
                                                "server": server, **tls})  # fmt: skip
                mirror = {"job-id": target, "device": drive, "target": target, "sync": sync}
                client.execute("blockdev-mirror", {**mirror, **({"speed": speed} if speed else {})})
            session.started = True
            session.snapshot = step(client, session, paths, 0.0)
        except QMPError as error:
            raise failed(name, f"QEMU did not start the migration: {error}") from error
    session.watcher = threading.Thread(target=watch, args=(paths, session), name=f"watch-{name}", daemon=True)
    session.watcher.start()
    return session.snapshot


def watch(paths: GuestFiles, session: Leaving) -> None:
    """Follows QEMU in a thread of the agent that started the migration, whatever the client does meanwhile:
    the memory starts the moment the mirrors are in step, and the switch-over is done the moment QEMU
    pauses the guest for it, never a round trip of the client later. Each look at QEMU is a monitor session
    of its own, so other agents' requests about the guest get their turn in between."""
    while not session.stop.is_set():
        try:
            with qmp_session(paths) as client:
                snapshot = step(client, session, paths, WATCH_SECONDS, session.stop)
        except AgentError as error:
            snapshot, session.error = session.snapshot, error
        except QMPError as error:
            snapshot, session.error = session.snapshot, failed(session.name, f"QEMU stopped answering: {error}")
        with session.changed:
            session.snapshot = snapshot
            session.changed.notify_all()
        if session.error is not None or snapshot["phase"] == "completed":
            return


def source_status(host: Hypervisor, sessions: Sessions, name: str, wait: float) -> dict[str, Any]:
    """Where the migration is, as the watcher last saw it: at once when QEMU is done (or the migration
    failed), else after `wait` seconds."""
    session = sessions.leaving_guest(name)
    if not session.started:
        raise AgentError(ErrorCode.NOT_MIGRATING, f"guest {name!r}: its migration has not started")
    with session.changed:
        session.changed.wait_for(lambda: session.error is not None or session.snapshot["phase"] == "completed", wait)
        if session.error is not None:
            raise session.error
        return session.snapshot


def step(
    client: QMPClient, session: Leaving, paths: GuestFiles, wait: float, stop: threading.Event | None = None
) -> dict[str, Any]:
    """QEMU looked at every POLL_SECONDS for up to `wait` seconds (or until `stop`), doing what is due:
    the memory started, the switch-over; the last look, as the client is shown it."""
    deadline = time.monotonic() + wait
    while True:
        jobs = {str(job["device"]): job for job in client.execute("query-block-jobs")}
        status: dict[str, Any] = client.execute("query-migrate")
        state = status.get("status", "none")
        mine = {drive: jobs.get(job_name(drive)) for drive in session.mirrors}
        gone = [drive for drive, job in mine.items() if job is None]
        if gone and not session.switched:
            cancel(client)
            cut = ", ".join(gone)
            raise failed(session.name, f"the copy of {cut} ended before the switch-over (its stream was cut, or the "
                                       "destination stopped taking it); the guest runs on here")  # fmt: skip
        if state in ("failed", "cancelled"):
            cancel(client)
            raise failed(session.name, f"QEMU's migration {state}: {status.get('error-desc', 'no reason given')}; "
                                       "the guest runs on here")  # fmt: skip
        if not session.memory_started and all(job and job.get("ready") for job in mine.values()):
            client.execute("migrate", {"uri": session.memory_uri})
            session.memory_started = True
        elif state == "pre-switchover" and not session.switched:
            # Once: QEMU may still say pre-switchover a moment after migrate-continue.
            switch_over(client, session)
        elif state == "completed" or time.monotonic() >= deadline or (stop is not None and stop.is_set()):
            return snapshot(session, status, mine)
        time.sleep(POLL_SECONDS)


def switch_over(client: QMPClient, session: Leaving) -> None:
    """The guest is paused: each mirror ended in step (so the destination's disks equal these), then the
    device state goes."""
    for drive in session.mirrors:
        client.execute("block-job-cancel", {"device": job_name(drive)})
    pending = {job_name(drive) for drive in session.mirrors}
    while pending:
        event = client.wait_event("BLOCK_JOB_COMPLETED", SWITCHOVER_WAIT)
        device = str(event.data.get("device"))
        if device in pending and (event.data.get("error") or event.data.get("offset") != event.data.get("len")):
            cancel(client)
            raise failed(session.name, f"the copy of {device} did not end in step: {event.data.get('error')}")
        pending.discard(device)
    client.execute("migrate-continue", {"state": "pre-switchover"})
    session.switched = True


def snapshot(session: Leaving, status: dict[str, Any], jobs: dict[str, Any]) -> dict[str, Any]:
    ram = status.get("ram", {})
    state = status.get("status", "none")
    if state == "completed":
        phase = "completed"
    elif state in ("pre-switchover", "device") or session.switched:
        phase = "switch-over"
    elif session.memory_started:
        phase = "memory"
    else:
        phase = "disks"
    return {
        "name": session.name,
        "phase": phase,
        "status": state,
        "disks": [
            {"drive": drive, "copied": int(job["offset"]), "total": int(job["len"]), "ready": bool(job["ready"])}
            for drive, job in jobs.items()
            if job is not None
        ],
        "memory": {
            "transferred": int(ram.get("transferred", 0)),
            "remaining": int(ram.get("remaining", 0)),
            "total": int(ram.get("total", 0)),
            "dirty_bytes_per_second": int(ram.get("dirty-pages-rate", 0) * ram.get("page-size", 4096)),
            "mbps": float(ram.get("mbps", 0.0)),
        },
        "expected_downtime_ms": status.get("expected-downtime"),
        "downtime_ms": status.get("downtime"),
        "total_ms": status.get("total-time"),
        "setup_ms": status.get("setup-time"),
    }


def source_finish(host: Hypervisor, store: Store, sessions: Sessions, name: str) -> dict[str, Any]:
    """The destination has the guest: this node's QEMU, definition and disks go. From the connection that
    began the migration, or another (the client lost that one): a running guest only once QEMU says its
    migration completed."""
    session = sessions.leaving.pop(name, None)
    lock = session.lock if session else contextlib.ExitStack()
    with lock:
        if session is None:
            store.guest(name)
            lock.enter_context(operation(host, name))
        else:
            session.stop_watching()
        if running_pid(host.paths(name)) is not None:
            with qmp(host, name) as client:
                state = client.execute("query-migrate").get("status")
            if state != "completed":
                raise AgentError(ErrorCode.NOT_MIGRATING, f"guest {name!r}: its migration is {state}, not completed")
        delete_locked(host, store, name, force=True, remove_disks=True)
    return {"name": name, "removed": True}


def source_abort(host: Hypervisor, store: Store, sessions: Sessions, name: str, resume: bool) -> dict[str, Any]:
    """The guest stays here: a migration in progress is cancelled (the guest runs on), the copies end;
    `resume`: a guest QEMU had paused at the end of a finished migration runs again (only the client
    knows the destination did not take it). From the connection that began it, or any other."""
    session = sessions.leaving.pop(name, None)
    lock = session.lock if session else contextlib.ExitStack()
    with lock:
        if session is None:
            store.guest(name)
            lock.enter_context(operation(host, name))
        else:
            session.stop_watching()
        state = stay(host, name, resume)
    return {"name": name, "state": state}


def stay(host: Hypervisor, name: str, resume: bool) -> str:
    paths = host.paths(name)
    for stream in (MEMORY, *(path.stem.removeprefix("mig-") for path in paths.directory.glob("mig-*.sock"))):
        outgoing_socket(paths, stream).unlink(missing_ok=True)
    if running_pid(paths) is None:
        return "stopped"
    try:
        with qmp_session(paths) as client:
            cancel(client)
            drop_tls(client)
            state = str(client.execute("query-status")["status"])
            if resume and state == "postmigrate":
                client.execute("cont")
                state = str(client.execute("query-status")["status"])
    except QMPError as error:
        raise AgentError(ErrorCode.QMP_FAILED, f"guest {name!r}: {error}") from error
    return state


def cancel(client: QMPClient) -> None:
    """A migration still moving is cancelled (QEMU then runs the guest on), the mirrors are ended at once
    and their NBD targets let go."""
    deadline = time.monotonic() + SWITCHOVER_WAIT
    if client.execute("query-migrate").get("status") in ACTIVE:
        client.execute("migrate_cancel")
        while client.execute("query-migrate").get("status") in ACTIVE and time.monotonic() < deadline:
            time.sleep(POLL_SECONDS)
    for job in client.execute("query-block-jobs"):
        if str(job["device"]).startswith(JOB_PREFIX):
            with contextlib.suppress(QMPError):  # it may end by itself meanwhile
                client.execute("block-job-cancel", {"device": job["device"], "force": True})
    while any(str(job["device"]).startswith(JOB_PREFIX) for job in client.execute("query-block-jobs")):
        if time.monotonic() >= deadline:
            break
        time.sleep(POLL_SECONDS)
    for node in client.execute("query-named-block-nodes", {"flat": True}):
        if str(node.get("node-name", "")).startswith(JOB_PREFIX):
            with contextlib.suppress(QMPError):
                client.execute("blockdev-del", {"node-name": node["node-name"]})


METHODS: dict[str, Method] = {
    "migration.source_begin": lambda host, store, sessions, params: source_begin(
        host, store, sessions, name_of(params)
    ),
    "migration.source_start": lambda host, store, sessions, params: source_start(
        host,
        sessions,
        name_of(params, {"bandwidth_mib", "direct"}),
        check_int(params, "bandwidth_mib", 0, 1 << 20, 0),
        parse_direct(params, leaving=True),
    ),
    "migration.source_status": lambda host, store, sessions, params: source_status(
        host, sessions, name_of(params, {"wait"}), check_int(params, "wait", 0, MAX_STATUS_WAIT, 1)
    ),
    "migration.source_finish": lambda host, store, sessions, params: source_finish(
        host, store, sessions, name_of(params)
    ),
    "migration.source_abort": lambda host, store, sessions, params: source_abort(
        host, store, sessions, name_of(params, {"resume"}), flag(params, "resume", False)
    ),
}

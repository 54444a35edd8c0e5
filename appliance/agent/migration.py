"""Guests moved between nodes, the node's side: a guest leaving this node, and one arriving.

Nodes never talk to each other: the operator's client (appliance.nodes.migrate)
holds a connection to each node's agent, asks each for its part, and relays
every stream between them through the relay methods of streams.py. A running
guest moves as libvirt moves one with local disks (QEMU's own sequence,
qemu-iotests 194):

- arriving (dest_*): the guest's directory with blank disks as large as the
  leaving guest's, then QEMU paused and waiting for the migration
  (-incoming defer, -S, on the machine type the guest runs as on its node),
  an NBD server on a unix socket exporting each disk, and migrate-incoming
  on another socket.
- leaving (source_*): each disk mirrored into the arriving guest's NBD
  export (blockdev-mirror; only the top layer over a base image, which both
  nodes have), then, once every mirror is in step, the memory; QEMU pauses
  before the switch-over, the mirrors are ended in step (the disks are
  equal), and the device state goes last.
- the destination takes the guest (its row committed: this is its
  confirmation), resumes it, and only then the source removes its QEMU, its
  definition and its disks.

A stopped guest moves as files: its disks copied, its definition committed on
the destination, then removed from the source.

Until the destination commits, the source's guest is the guest: any failure
(a refusal, the connection cut, the destination's agent killed) leaves it
running there, and whatever was made for it on the destination is removed:
by the destination's agent when its connection ends (Sessions.close), by
migration.dest_abort, or, if that agent was killed, by the next agent's
repair (repair_arrival): an arriving guest's directory holds a marker
`.incoming-PID` naming the agent that owns it, and has no row.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from appliance.agent import media, nics, seed
from appliance.agent.accel import QEMU
from appliance.agent.crashpoints import crash_point
from appliance.agent.disks import running_size
from appliance.agent.errors import AgentError, ErrorCode, guest_exists, image_not_found
from appliance.agent.guests import (
    CREATING_PREFIX,
    QEMU_IMG,
    Hypervisor,
    delete_locked,
    disks_bytes,
    drive_id,
    image_format,
    image_info,
    launch,
    make_disk,
    operation,
    qemu_argv,
    qmp,
    work_dir,
)
from appliance.agent.host import read_bridges, read_cpu_model
from appliance.agent.model import (
    GuestSpec,
    check_fields,
    check_int,
    check_name,
    guest_spec_from_json,
    invalid_field,
    parse_guest_spec,
)
from appliance.agent.policy import check_create, check_disks, check_start
from appliance.agent.qemu import qmp_session, running_pid, wait_gone
from appliance.agent.qmp import QMPClient, QMPError
from appliance.agent.store import Store
from appliance.agent.supervisors import GuestFiles
from appliance.agent.tools import run_tool

# In an arriving guest's directory: who owns it (.incoming-PID), and the launcher's one-shot marker.
INCOMING_PREFIX = ".incoming-"
LAUNCH_MARKER = "incoming"
# The arriving QEMU's sockets: its migration listener and its NBD server.
MEMORY_SOCKET = "mig-in.sock"
NBD_SOCKET = "nbd.sock"
# The streams of a live migration: the memory, and one per disk (named as its drive).
MEMORY = "memory"
# A disk's file in its guest's directory (model.disk_file's names).
DISK_FILE = re.compile(r"disk[0-9]{1,3}\.qcow2")
# The leaving QEMU's mirror jobs and their NBD targets: mig-DRIVE.
JOB_PREFIX = "mig-"
POLL_SECONDS = 0.02
# --direct: the TLS credentials' object in each QEMU, their files' most size, what an address may be.
TLS_OBJECT = "mig-tls"
MAX_PEM = 16 * 1024
HOST = re.compile(r"[A-Za-z0-9][A-Za-z0-9.:-]{0,252}")
LISTEN_ADDRESS = "0.0.0.0"
# Bounds on one status call's wait, on a destination's wait for its migration's last bytes, and on the
# mirrors ending in step at the switch-over (they are in step already: a few seconds is plenty).
MAX_STATUS_WAIT = 5
# How long the watcher holds the monitor at a time (another agent asking about the guest waits at most so).
WATCH_SECONDS = 0.5
FINISH_WAIT = 60.0
SWITCHOVER_WAIT = 60.0
# QEMU's migration states in which it is still moving (query-migrate's status).
ACTIVE = {"setup", "active", "pre-switchover", "device", "cancelling", "wait-unplug", "postcopy-active",
          "postcopy-paused", "postcopy-recover"}  # fmt: skip


def outgoing_socket(paths: GuestFiles, stream: str) -> Path:
    """Where the leaving QEMU connects for a stream; the stream's relay (streams.py) listens there."""
    return paths.directory / f"mig-{stream}.sock"


def job_name(drive: str) -> str:
    return f"{JOB_PREFIX}{drive}"


def copied_files(spec: GuestSpec, live: bool) -> list[str]:
    """The files of a guest that are copied as they are: a stopped guest's disks; a running guest's
    cloud-init seed (its disks are mirrored), byte for byte the volume the guest has attached."""
    if not live:
        return [disk.file for disk in spec.disks]
    if spec.cloud_init:
        return [seed.seed_path(Path(), spec.name, spec.cloud_init).name]
    return []


# --- comparing what a guest runs as with what a node would start ---------------------------------------


def comparable_argv(argv: list[str], directory: Path, images_dir: Path) -> list[str]:
    """QEMU's command line with what differs between two nodes running the same machine taken out: the
    launcher in front of it, the guest's and the images' directories, the machine type's version (the
    arriving guest is given its node's), the migration's own arguments, and vhost (a host-side backend)."""
    if argv and argv[0] != QEMU and "--" in argv:
        argv = argv[argv.index("--") + 1 :]
    comparable: list[str] = []
    skip = False
    for index, argument in enumerate(argv):
        if skip:
            skip = False
            continue
        if argument == "-incoming":
            skip = True
            continue
        if argument == "-S":
            continue
        if index > 0 and argv[index - 1] == "-machine":
            argument = "{machine}," + argument.partition(",")[2]
        argument = argument.replace(str(directory), "{guest}").replace(str(images_dir), "{images}")
        comparable.append(argument.replace(",vhost=on", ""))
    return comparable


def running_argv(pid: int) -> list[str]:
    return [part.decode() for part in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]]


def first_difference(ours: list[str], theirs: list[str]) -> str:
    for index, (mine, other) in enumerate(zip(ours, theirs, strict=False)):
        if mine != other:
            return f"argument {index}: {other!r} there, {mine!r} here"
    return f"{len(theirs)} arguments there, {len(ours)} here"


def qemu_version() -> tuple[int, ...]:
    text = run_tool([QEMU, "--version"])
    match = re.search(r"version (\d+)\.(\d+)\.(\d+)", text)
    if match is None:
        raise AgentError(ErrorCode.TOOL_FAILED, f"{QEMU} --version says no version: {text.strip()[:200]}")
    return tuple(int(part) for part in match.groups())


def machine_types() -> set[str]:
    lines = run_tool([QEMU, "-machine", "help"]).splitlines()[1:]
    return {line.split()[0] for line in lines if line.strip()}


def refused(message: str) -> AgentError:
    return AgentError(ErrorCode.MIGRATION_REFUSED, message)


def failed(name: str, message: str) -> AgentError:
    return AgentError(ErrorCode.MIGRATION_FAILED, f"guest {name!r}: {message}")


# --- a direct migration: TCP with TLS between the nodes ------------------------------------------------


@dataclass(frozen=True)
class Direct:
    """A migration whose streams go straight from node to node, over TLS with credentials the client made
    for it (`tls`: ca, cert and key, PEM): the destination listens on two TCP ports, the source connects
    to them at `address`."""

    tls: dict[str, str]
    address: str = ""
    ports: dict[str, int] = field(default_factory=dict)


def parse_direct(params: dict[str, Any], leaving: bool) -> Direct | None:
    value = params.get("direct")
    if value is None:
        return None
    if not isinstance(value, dict):
        raise invalid_field("direct", "must be an object: tls (and, leaving, address and ports)")
    check_fields(value, {"tls", "address", "ports"} if leaving else {"tls"}, "direct")
    tls = value.get("tls")
    if not isinstance(tls, dict) or set(tls) != {"ca", "cert", "key"}:
        raise invalid_field("direct.tls", "must be {ca, cert, key}, each PEM text")
    for part, text in tls.items():
        if not isinstance(text, str) or not text.startswith("-----BEGIN ") or len(text) > MAX_PEM:
            raise invalid_field(f"direct.tls.{part}", f"must be PEM text of at most {MAX_PEM} characters")
    if not leaving:
        return Direct(tls)
    address = value.get("address")
    if not isinstance(address, str) or not HOST.fullmatch(address):
        raise invalid_field("direct.address", "must be the destination's host name or IP address")
    ports = value.get("ports")
    if not isinstance(ports, dict):
        raise invalid_field("direct.ports", "must be the destination's ports: {nbd, memory}")
    return Direct(tls, address, {stream: check_int(ports, stream, 1, 65535) for stream in ("nbd", "memory")})


def load_tls(client: QMPClient, directory: Path, tls: dict[str, str], endpoint: str) -> None:
    """QEMU's TLS credentials object from the client's PEM text: written for QEMU to read, and removed as
    soon as it has (it keeps them in memory)."""
    work = directory / f".tls-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(mode=0o700)
    try:
        for file, part in (("ca-cert.pem", "ca"), (f"{endpoint}-cert.pem", "cert"), (f"{endpoint}-key.pem", "key")):
            path = work / file
            path.touch(mode=0o600)
            path.write_text(tls[part])
        with contextlib.suppress(QMPError):  # one a migration that stayed here left
            client.execute("object-del", {"id": TLS_OBJECT})
        client.execute("object-add", {"qom-type": "tls-creds-x509", "id": TLS_OBJECT, "endpoint": endpoint,
                                      "dir": str(work), "verify-peer": True})  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)


def drop_tls(client: QMPClient) -> None:
    """A direct migration's credentials gone from QEMU (the next migration is relayed, or brings its own)."""
    for command, arguments in (("migrate-set-parameters", {"tls-creds": ""}), ("object-del", {"id": TLS_OBJECT})):
        with contextlib.suppress(QMPError):  # none there: a relayed migration's
            client.execute(command, arguments)


def free_ports(count: int) -> list[int]:
    """Ports nothing listens on now (QEMU takes them a moment later)."""
    with contextlib.ExitStack() as stack:
        probes = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(count)]
        for probe in probes:
            probe.bind((LISTEN_ADDRESS, 0))
        return [int(probe.getsockname()[1]) for probe in probes]


def tcp_uri(address: str, port: int) -> str:
    return f"tcp:[{address}]:{port}" if ":" in address else f"tcp:{address}:{port}"


# --- a guest leaving this node -------------------------------------------------------------------------


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

    def stop_watching(self) -> None:
        """The watcher ended (before anything else asks QEMU to do something about this migration)."""
        self.stop.set()
        if self.watcher is not None:
            self.watcher.join(timeout=SWITCHOVER_WAIT)


@dataclass
class Arriving:
    """A guest this connection is receiving; its directory is removed unless it is committed."""

    spec: GuestSpec
    arrival: Arrival
    lock: contextlib.ExitStack
    listening: bool = False
    direct: bool = False


@dataclass
class Sessions:
    """This connection's migrations. When the connection ends (its client gone, cut off), a guest
    still arriving is removed, and a guest still leaving stays here: a migration QEMU has not finished
    is cancelled (the guest runs on); one it finished stays paused, since the destination may have
    taken the guest (the client, reconnecting, knows and says: migration.source_abort)."""

    leaving: dict[str, Leaving] = field(default_factory=dict)
    arriving: dict[str, Arriving] = field(default_factory=dict)

    def leaving_guest(self, name: str) -> Leaving:
        if name not in self.leaving:
            raise AgentError(ErrorCode.NOT_MIGRATING, f"guest {name!r} is not leaving through this connection")
        return self.leaving[name]

    def arriving_guest(self, name: str) -> Arriving:
        if name not in self.arriving:
            raise AgentError(ErrorCode.NOT_MIGRATING, f"guest {name!r} is not arriving through this connection")
        return self.arriving[name]

    def close(self, host: Hypervisor) -> None:
        for name in list(self.arriving):
            with self.arriving.pop(name).lock:
                abandon(host, name)
        for name in list(self.leaving):
            session = self.leaving.pop(name)
            session.stop_watching()
            with session.lock:
                try:
                    stay(host, name, resume=False)
                except AgentError as error:  # the connection is gone: the node's journal is who hears of it
                    print(f"migration: {name}: left as it was: {error}", file=sys.stderr)


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
    if running != comparable_argv(qemu_argv(host, spec, paths), paths.directory, host.images_dir):
        raise refused(
            f"guest {name!r} runs with an older definition than it has now (changed by guest.update, or a disk "
            "added since it started): restart it to migrate it running, or stop it to migrate it stopped"
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


# --- a guest arriving on this node ---------------------------------------------------------------------


@dataclass(frozen=True)
class Arrival:
    """What the leaving node said of the guest (source_begin's answer), checked."""

    spec: GuestSpec
    state: str
    images: dict[str, str]
    disk_sizes: dict[str, int]
    accel: str = ""
    cpu_model: str = ""
    machine: str = ""
    qemu_version: tuple[int, ...] = ()
    qemu_argv: tuple[str, ...] = ()

    @property
    def live(self) -> bool:
        return self.state != "stopped"


def parse_arrival(params: dict[str, Any]) -> Arrival:
    check_fields(params, {"departure"}, "params")
    departure = params.get("departure")
    if not isinstance(departure, dict):
        raise invalid_field("departure", "must be the leaving node's migration.source_begin answer")
    definition = departure.get("definition")
    try:
        spec = guest_spec_from_json(definition)  # type: ignore[arg-type]
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise invalid_field("departure.definition", f"not a guest definition: {error}") from error
    # Checked as a new definition is (stored as it came); its disks' files and grown sizes as they are.
    parse_guest_spec(spec.to_params())
    for index, disk in enumerate(spec.disks):
        if not DISK_FILE.fullmatch(disk.file) or isinstance(disk.size_gib, bool) or not isinstance(disk.size_gib, int):
            raise invalid_field(f"departure.definition.disks[{index}]", f"{disk!r} is not a guest's disk")
    state = departure.get("state")
    if state not in ("running", "paused", "stopped"):
        raise invalid_field("departure.state", "must be running, paused or stopped")
    images = departure.get("images", {})
    if not isinstance(images, dict) or set(images) != spec.images_used():
        raise invalid_field("departure.images", "must name the sha256 of each image the guest uses")
    given = {str(disk.get("file")): disk.get("virtual_size") for disk in departure.get("disks", [])
             if isinstance(disk, dict)}  # fmt: skip
    sizes = {disk.file: check_int(given, disk.file, 1, 1 << 56) for disk in spec.disks}
    arrival = Arrival(spec, str(state), {str(key): str(value) for key, value in images.items()}, sizes)
    if not arrival.live:
        return arrival
    version = departure.get("qemu_version")
    argv = departure.get("qemu_argv")
    if not (isinstance(version, list) and all(isinstance(part, int) for part in version)):
        raise invalid_field("departure.qemu_version", "must be [major, minor, micro]")
    if not (isinstance(argv, list) and all(isinstance(part, str) for part in argv)):
        raise invalid_field("departure.qemu_argv", "must be QEMU's command line, a list of strings")
    machine = departure.get("machine")
    if not isinstance(machine, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", machine):
        raise invalid_field("departure.machine", "must be a QEMU machine type")
    return replace(arrival, accel=str(departure.get("accel")), cpu_model=str(departure.get("cpu_model")),
                   machine=machine, qemu_version=tuple(version), qemu_argv=tuple(argv))  # fmt: skip


def check_arrival(host: Hypervisor, store: Store, arrival: Arrival) -> list[str]:
    """Everything this node can tell before anything moves; the images it lacks (copied first)."""
    spec = arrival.spec
    name = spec.name
    if store.has_guest(name) or host.paths(name).directory.exists():
        raise guest_exists(name)
    rows = {str(image["name"]): str(image["sha256"]) for image in store.images()}
    missing = []
    for image, sha256 in sorted(arrival.images.items()):
        if image not in rows:
            missing.append(image)
        elif rows[image] != sha256:
            raise refused(
                f"image {image!r} here is not the one guest {name!r} uses (sha256 {rows[image][:12]}... here, "
                f"{sha256[:12] or 'unknown'}... on its node): give one of them another name"
            )
    capacity = host.capacity()
    defined = store.guests()
    check_create(host.policy, capacity, defined, spec)
    if arrival.live:
        running = [other for other in defined if running_pid(host.paths(other.name)) is not None]
        check_start(host.policy, capacity, running, spec)
    sizes: dict[str, int] = {}
    defined_bytes = sum(disks_bytes(host, other, sizes) for other in defined)
    check_disks(host.policy, capacity, defined_bytes, sum(arrival.disk_sizes.values()), name)
    nics.check_nics_on_node(spec, host.network, read_bridges())
    taken = nics.macs_in_use(defined)
    for index, nic in enumerate(spec.nics):
        if nic.mac in taken:
            raise invalid_field(f"nics[{index}].mac", f"{nic.mac} is used by guest {taken[nic.mac]!r} on this node")
    if arrival.live:
        check_machine(host, arrival)
    return missing


def check_machine(host: Hypervisor, arrival: Arrival) -> None:
    """The guest's CPU and machine can be had here: the same accelerator (KVM's `-cpu host` is the node's
    own CPU: the same model), the machine type it runs as, and a QEMU no older than its node's."""
    name = arrival.spec.name
    if host.accel.accel != arrival.accel:
        raise refused(
            f"guest {name!r} runs under {arrival.accel.upper()} on its node, and this node runs guests under "
            f"{host.accel.accel.upper()} ({host.accel.reason}): its CPU cannot be the same here"
        )
    if arrival.accel == "kvm" and read_cpu_model() != arrival.cpu_model:
        raise refused(
            f"guest {name!r} runs on the host CPU of its node ({arrival.cpu_model}); this node's is another "
            f"({read_cpu_model()})"
        )
    version = qemu_version()
    if version < arrival.qemu_version:
        there, here = ".".join(map(str, arrival.qemu_version)), ".".join(map(str, version))
        raise refused(f"guest {name!r} runs on QEMU {there}; this node's QEMU is older ({here})")
    if arrival.machine not in machine_types():
        raise refused(f"guest {name!r} runs as machine {arrival.machine}, which this node's QEMU does not have")


def dest_check(host: Hypervisor, store: Store, sessions: Sessions, params: dict[str, Any]) -> dict[str, Any]:
    """Whether this node takes the guest, changing nothing; the images to copy here first."""
    arrival = parse_arrival(params)
    return {"name": arrival.spec.name, "missing_images": check_arrival(host, store, arrival)}


def dest_begin(host: Hypervisor, store: Store, sessions: Sessions, params: dict[str, Any]) -> dict[str, Any]:
    """The arriving guest's directory, owned by this connection's agent (.incoming-PID), with blank disks
    as large as the guest's when it runs (they are mirrored into); no row yet."""
    arrival = parse_arrival(params)
    spec, name = arrival.spec, arrival.spec.name
    lock = contextlib.ExitStack()
    lock.enter_context(operation(host, name))
    try:
        missing = check_arrival(host, store, arrival)
        if missing:
            raise image_not_found(missing[0])
        media.check_cdrom(store, host.images_dir, spec)
        paths = host.paths(name)
        if arrival.live:
            ours = comparable_argv(qemu_argv(host, spec, paths, arrival.machine), paths.directory, host.images_dir)
            if ours != list(arrival.qemu_argv):
                raise refused(
                    f"guest {name!r} would run here as another machine than on its node (its agent differs: "
                    f"{first_difference(ours, list(arrival.qemu_argv))})"
                )
        making = GuestFiles(work_dir(host, CREATING_PREFIX, name))
        making.directory.mkdir(parents=True)
        try:
            (making.directory / f"{INCOMING_PREFIX}{os.getpid()}").touch()
            if arrival.live:
                for disk in spec.disks:
                    make_disk(host, disk, making.disk(disk), arrival.disk_sizes[disk.file])
            crash_point("migration-in:made")
            making.directory.rename(paths.directory)
        except BaseException:
            shutil.rmtree(making.directory, ignore_errors=True)
            raise
        crash_point("migration-in:arriving")
    except BaseException:
        lock.close()
        raise
    sessions.arriving[name] = Arriving(spec, arrival, lock)
    return {"name": name, "files": copied_files(spec, arrival.live)}


def dest_listen(host: Hypervisor, store: Store, sessions: Sessions, name: str, direct: Direct | None) -> dict[str, Any]:
    """QEMU started, paused, waiting for the migration; its disks exported over NBD (writable) for the
    mirrors, its migration listener on a socket, where the streams' relays (streams.py) connect; or
    (`direct`) both on TCP ports of this node, over TLS, for a source holding the client's credentials."""
    session = sessions.arriving_guest(name)
    if not session.arrival.live or session.listening:
        raise AgentError(ErrorCode.NOT_MIGRATING, f"guest {name!r}: nothing to listen for (stopped, or listening)")
    spec, paths = session.spec, host.paths(name)
    for file in copied_files(spec, live=True):
        if not (paths.directory / file).is_file():
            raise AgentError(ErrorCode.NOT_MIGRATING, f"guest {name!r}: {file} has not been copied here yet")
    running = [other for other in store.guests() if running_pid(host.paths(other.name)) is not None]
    check_start(host.policy, host.capacity(), running, spec)
    marker = paths.directory / LAUNCH_MARKER
    marker.touch()
    session.listening, session.direct = True, direct is not None
    launch(host, spec, paths, session.arrival.machine, marker)
    answer: dict[str, Any] = {"name": name, "pid": running_pid(paths)}
    with qmp(host, name) as client:
        try:
            nodes = {str(block["device"]): str(block["inserted"]["node-name"])
                     for block in client.execute("query-block") if block.get("inserted")}  # fmt: skip
            if direct:
                load_tls(client, paths.directory, direct.tls, "server")
                nbd_port, memory_port = free_ports(2)
                address = {"type": "inet", "data": {"host": LISTEN_ADDRESS, "port": str(nbd_port)}}
                client.execute("nbd-server-start", {"addr": address, "tls-creds": TLS_OBJECT})
                client.execute("migrate-set-parameters", {"tls-creds": TLS_OBJECT})
                memory_uri = tcp_uri(LISTEN_ADDRESS, memory_port)
                answer.update(streams=[], ports={"nbd": nbd_port, "memory": memory_port})
            else:
                address = {"type": "unix", "data": {"path": str(paths.directory / NBD_SOCKET)}}
                client.execute("nbd-server-start", {"addr": address})
                memory_uri = f"unix:{paths.directory / MEMORY_SOCKET}"
                answer["streams"] = [MEMORY, *(drive_id(disk) for disk in spec.disks)]
            for disk in spec.disks:
                drive = drive_id(disk)
                client.execute("block-export-add", {"type": "nbd", "id": job_name(drive), "node-name": nodes[drive],
                                                    "name": drive, "writable": True})  # fmt: skip
            client.execute("migrate-incoming", {"uri": memory_uri})
        except QMPError as error:
            raise failed(name, f"QEMU here could not wait for the migration: {error}") from error
    return answer


def dest_status(host: Hypervisor, store: Store, sessions: Sessions, name: str) -> dict[str, Any]:
    session = sessions.arriving_guest(name)
    if not session.listening:
        return {"name": name, "status": "none"}
    with qmp(host, name) as client:
        return {"name": name, "status": client.execute("query-migrate").get("status", "none")}


def dest_finish(host: Hypervisor, store: Store, sessions: Sessions, name: str, resume: bool) -> dict[str, Any]:
    """The guest becomes this node's: all of it here (its migration completed, or its files copied), its
    row committed, its marker gone; then it runs (`resume`, unless it was paused on its node)."""
    session = sessions.arriving_guest(name)
    spec, paths = session.spec, host.paths(name)
    try:
        if session.arrival.live:
            receive_last(host, name, session.direct)
        else:
            take_files(host, spec, paths)
        store.add_guest(spec)
    except BaseException:
        del sessions.arriving[name]
        with session.lock:
            abandon(host, name)
        raise
    crash_point("migration-in:row")
    for leftover in (*paths.directory.glob(f"{INCOMING_PREFIX}*"), paths.directory / NBD_SOCKET,
                     paths.directory / MEMORY_SOCKET, paths.directory / LAUNCH_MARKER):  # fmt: skip
        leftover.unlink(missing_ok=True)
    del sessions.arriving[name]
    session.lock.close()
    answer: dict[str, Any] = {"name": name, "defined": True, "running": session.arrival.live, "resumed": False}
    if session.arrival.live and resume:
        try:
            with qmp(host, name) as client:
                client.execute("cont")
            answer["resumed"] = True
        except AgentError as error:  # the guest is this node's all the same: said, not undone
            answer["resume_error"] = error.message
    return answer


def receive_last(host: Hypervisor, name: str, direct: bool) -> None:
    """This QEMU has the whole guest: its migration completed; then its NBD server (and a direct
    migration's credentials) go."""
    deadline = time.monotonic() + FINISH_WAIT
    with qmp(host, name) as client:
        try:
            while (state := client.execute("query-migrate").get("status")) != "completed":
                if state in ("failed", "cancelled") or time.monotonic() >= deadline:
                    raise failed(name, f"the migration here is {state}, not completed")
                time.sleep(POLL_SECONDS)
            client.execute("nbd-server-stop")
            if direct:
                drop_tls(client)
        except QMPError as error:
            raise failed(name, f"QEMU here did not finish the migration: {error}") from error


def take_files(host: Hypervisor, spec: GuestSpec, paths: GuestFiles) -> None:
    """A stopped guest's copied disks, whole, over this node's copies of their base images."""
    for file in copied_files(spec, live=False):
        if not (paths.directory / file).is_file():
            raise AgentError(ErrorCode.NOT_MIGRATING, f"guest {spec.name!r}: {file} has not been copied here")
    for disk in spec.disks:
        if disk.base_image:
            base = host.image(disk.base_image)
            run_tool([QEMU_IMG, "rebase", "-u", "-f", "qcow2", "-F", image_format(base), "-b", str(base),
                      str(paths.disk(disk))])  # fmt: skip


def dest_abort(host: Hypervisor, store: Store, sessions: Sessions, name: str) -> dict[str, Any]:
    """The arriving guest removed, whoever began it (an agent still holding it is ended first: its client
    has gone); answers whether the guest is this node's (`defined`: its arrival was committed)."""
    session = sessions.arriving.pop(name, None)
    if session is not None:
        with session.lock:
            abandon(host, name)
        return {"name": name, "removed": True, "defined": store.has_guest(name)}
    directory = host.paths(check_name(name)).directory
    owner = arrival_owner(directory)
    if owner is None:
        return {"name": name, "removed": False, "defined": store.has_guest(name)}
    end_owner(owner)
    with operation(host, name):
        removed = arrival_owner(directory) is not None
        if removed:
            abandon(host, name)
    return {"name": name, "removed": removed, "defined": store.has_guest(name)}


def arrival_owner(directory: Path) -> int | None:
    """The pid named by an arriving guest's marker (0 for a marker that names none)."""
    for marker in directory.glob(f"{INCOMING_PREFIX}*"):
        pid = marker.name.removeprefix(INCOMING_PREFIX)
        return int(pid) if pid.isdigit() else 0
    return None


def end_owner(pid: int, timeout: float = 10.0) -> None:
    """The agent holding an abandoned arrival ended (its connection is gone, or going)."""
    if pid <= 0 or pid == os.getpid():
        return
    try:
        if b"appliance" not in Path(f"/proc/{pid}/cmdline").read_bytes():
            return  # not an agent: the pid was reused
        os.kill(pid, signal.SIGTERM)
    except (OSError, ProcessLookupError):
        return
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(POLL_SECONDS)


def abandon(host: Hypervisor, name: str) -> None:
    """An arriving guest that did not arrive: its QEMU ended (never restarted by a unit), its directory
    removed. Only ever an uncommitted arrival's: callers hold its operation lock or own it."""
    files = host.paths(name)
    if arrival_owner(files.directory) is None:
        return
    pid = running_pid(files)
    if pid is not None:
        host.supervisor.force_off(name, files, pid)
        wait_gone(pid, 10)
    shutil.rmtree(files.directory, ignore_errors=True)


def repair_arrival(host: Hypervisor, directory: Path, defined: bool) -> None:
    """repair.py: an arrival whose agent died. Not committed: its QEMU ended and its directory removed.
    Committed (the agent died before it took its marker away): the marker goes."""
    owner = arrival_owner(directory)
    if owner is None or Path(f"/proc/{owner}").exists():
        return
    if defined:
        for marker in directory.glob(f"{INCOMING_PREFIX}*"):
            marker.unlink(missing_ok=True)
        return
    abandon(host, directory.name)


# --- the methods, as server.py lists them --------------------------------------------------------------


def name_of(params: dict[str, Any], extra: set[str] | None = None) -> str:
    check_fields(params, {"name"} | (extra or set()), "params")
    return check_name(params.get("name"))


def flag(params: dict[str, Any], field_name: str, default: bool) -> bool:
    value = params.get(field_name, default)
    if not isinstance(value, bool):
        raise invalid_field(field_name, "must be true or false")
    return value


Method = Callable[[Hypervisor, Store, Sessions, dict[str, Any]], Any]

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
    "migration.dest_check": dest_check,
    "migration.dest_begin": dest_begin,
    "migration.dest_listen": lambda host, store, sessions, params: dest_listen(
        host, store, sessions, name_of(params, {"direct"}), parse_direct(params, leaving=False)
    ),
    "migration.dest_status": lambda host, store, sessions, params: dest_status(host, store, sessions, name_of(params)),
    "migration.dest_finish": lambda host, store, sessions, params: dest_finish(
        host, store, sessions, name_of(params, {"resume"}), flag(params, "resume", True)
    ),
    "migration.dest_abort": lambda host, store, sessions, params: dest_abort(host, store, sessions, name_of(params)),
}

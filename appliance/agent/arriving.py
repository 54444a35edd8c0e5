"""A guest arriving on this node by migration (migration.py says how a guest moves, and why in this order).

Everything this node can tell is checked first (dest_check); the guest is made
in its directory under a marker naming the agent that owns it (.incoming-PID),
with no row (dest_begin); a running guest's QEMU waits for it, paused
(dest_listen); the guest becomes this node's when its row is committed
(dest_finish). Until then it is removed on any failure: by its agent when its
connection ends, by dest_abort from any connection, or by the next agent's
repair (repair_arrival) if its agent was killed.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from appliance.agent import media, nics
from appliance.agent.accel import QEMU
from appliance.agent.crashpoints import crash_point
from appliance.agent.errors import AgentError, ErrorCode, guest_exists, image_not_found
from appliance.agent.guests import (
    CREATING_PREFIX,
    QEMU_IMG,
    Hypervisor,
    disks_bytes,
    drive_id,
    image_format,
    launch,
    make_disk,
    operation,
    qemu_argv,
    qmp,
    work_dir,
)
from appliance.agent.host import read_bridges, read_cpu_model
from appliance.agent.migration import (
    DISK_FILE,
    LISTEN_ADDRESS,
    MEMORY,
    POLL_SECONDS,
    TLS_OBJECT,
    Direct,
    Method,
    Sessions,
    comparable_argv,
    copied_files,
    drop_tls,
    failed,
    first_difference,
    flag,
    free_ports,
    job_name,
    load_tls,
    name_of,
    parse_direct,
    refused,
    tcp_uri,
)
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
from appliance.agent.qemu import running_pid, wait_gone
from appliance.agent.qmp import QMPError
from appliance.agent.store import Store
from appliance.agent.supervisors import GuestFiles
from appliance.agent.tools import run_tool

# In an arriving guest's directory: who owns it (.incoming-PID), and the launcher's one-shot marker.
INCOMING_PREFIX = ".incoming-"
LAUNCH_MARKER = "incoming"
# The arriving QEMU's sockets: its migration listener and its NBD server.
MEMORY_SOCKET = "mig-in.sock"
NBD_SOCKET = "nbd.sock"
# How long the destination waits for its migration's last bytes once the source has sent them.
FINISH_WAIT = 60.0
# The arriving QEMU reads the incoming stream in its main loop, which is also the one that answers its
# monitor: while bytes keep coming faster than it takes them (TLS on a slow or emulated CPU, a nested
# node's), it may not answer for longer than QMP's usual 10 s. Less than a client's 60 s per request.
INCOMING_MONITOR_TIMEOUT = 45.0


def qemu_version() -> tuple[int, ...]:
    """This node's QEMU version, as (major, minor, micro)."""
    text = run_tool([QEMU, "--version"])
    match = re.search(r"version (\d+)\.(\d+)\.(\d+)", text)
    if match is None:
        raise AgentError(ErrorCode.TOOL_FAILED, f"{QEMU} --version says no version: {text.strip()[:200]}")
    return tuple(int(part) for part in match.groups())


def machine_types() -> set[str]:
    """The machine types this node's QEMU has (versioned names and aliases)."""
    lines = run_tool([QEMU, "-machine", "help"]).splitlines()[1:]
    return {line.split()[0] for line in lines if line.strip()}


@dataclass
class Arriving:
    """A guest this connection is receiving; its directory is removed unless it is committed."""

    spec: GuestSpec
    arrival: Arrival
    lock: contextlib.ExitStack
    listening: bool = False
    direct: bool = False

    def end(self, host: Hypervisor) -> None:
        """The connection that began it ended before the guest was taken: it goes."""
        with self.lock:
            abandon(host, self.spec.name)


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
    disks = departure.get("disks")
    if not isinstance(disks, list):
        raise invalid_field("departure.disks", "must list each disk's file and virtual_size")
    given = {str(disk.get("file")): disk.get("virtual_size") for disk in disks if isinstance(disk, dict)}
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
    """Whether the arrival is still here (the client asks as it goes): its QEMU's migration status, or
    `busy` when that QEMU runs but is too taken up with the incoming stream to answer its monitor."""
    session = sessions.arriving_guest(name)
    if not session.listening:
        return {"name": name, "status": "none"}
    try:
        with qmp(host, name) as client:
            return {"name": name, "status": client.execute("query-migrate").get("status", "none")}
    except AgentError:
        if running_pid(host.paths(name)) is None:
            raise
        return {"name": name, "status": "busy"}


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
    with qmp(host, name, INCOMING_MONITOR_TIMEOUT) as client:
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


METHODS: dict[str, Method] = {
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

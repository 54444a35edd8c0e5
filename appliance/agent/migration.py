"""Guests moved between nodes, the node's side: what both ends share. A guest leaving this node is
leaving.py's, one arriving arriving.py's, the bytes between them streams.py's.

Nodes never talk to each other: the operator's client (appliance.nodes.migrate)
holds a connection to each node's agent, asks each for its part, and relays
every stream between them through the relay methods of streams.py. A running
guest moves as libvirt moves one with local disks (QEMU's own sequence,
qemu-iotests 194):

- arriving (arriving.py, migration.dest_*): the guest's directory with
  blank disks as large as the leaving guest's, then QEMU paused and waiting
  for the migration (-incoming defer, -S, on the machine type the guest runs
  as on its node), an NBD server on a unix socket exporting each disk, and
  migrate-incoming on another socket.
- leaving (leaving.py, migration.source_*): each disk mirrored into the
  arriving guest's NBD export (blockdev-mirror; only the top layer over a
  base image, which both nodes have), then, once every mirror is in step,
  the memory; QEMU pauses before the switch-over, the mirrors are ended in
  step (the disks are equal), and the device state goes last.
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
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.agent import seed
from appliance.agent.accel import QEMU
from appliance.agent.errors import AgentError, ErrorCode
from appliance.agent.guests import Hypervisor
from appliance.agent.model import GuestSpec, check_fields, check_int, check_name, invalid_field
from appliance.agent.qmp import QMPClient, QMPError
from appliance.agent.store import Store
from appliance.agent.supervisors import GuestFiles

if TYPE_CHECKING:
    from appliance.agent.arriving import Arriving
    from appliance.agent.leaving import Leaving

# The streams of a live migration: the memory, and one per disk (named as its drive).
MEMORY = "memory"
# A disk's file in its guest's directory (model.disk_file's names).
DISK_FILE = re.compile(r"disk[0-9]{1,3}\.qcow2")
# The leaving QEMU's mirror jobs and their NBD targets: mig-DRIVE.
JOB_PREFIX = "mig-"
POLL_SECONDS = 0.02
# --direct: the TLS credentials' object in each QEMU, their files' most size, what an address may be,
# where the destination listens.
TLS_OBJECT = "mig-tls"
MAX_PEM = 16 * 1024
HOST = re.compile(r"[A-Za-z0-9][A-Za-z0-9.:-]{0,252}")
LISTEN_ADDRESS = "0.0.0.0"
# Where the credentials wait in the guest's directory for QEMU to load them (repair.py removes those of
# a dead agent).
TLS_PREFIX = ".tls-"


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


def comparable_argv(argv: list[str], directory: Path, images_dir: Path) -> list[str]:
    """QEMU's command line with what differs between two nodes running the same machine taken out: the
    launcher in front of it, where QEMU's program was found, the guest's and the images' directories, the
    machine type's version (the arriving guest is given its node's), the migration's own arguments, and
    vhost (a host-side backend)."""
    if argv and Path(argv[0]).name != QEMU and "--" in argv:
        argv = argv[argv.index("--") + 1 :]
    if argv and Path(argv[0]).name == QEMU:
        # systemd-run starts the program it found on PATH by its full path (/usr/bin/...): a guest with no
        # launcher runs with that as its argv[0], one through the launcher (exec'd by name) with QEMU's name.
        argv = [QEMU, *argv[1:]]
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


def first_difference(ours: list[str], theirs: list[str], here: str = "here", there: str = "there") -> str:
    for index, (mine, other) in enumerate(zip(ours, theirs, strict=False)):
        if mine != other:
            return f"argument {index}: {other!r} {there}, {mine!r} {here}"
    return f"{len(theirs)} arguments {there}, {len(ours)} {here}"


def refused(message: str) -> AgentError:
    return AgentError(ErrorCode.MIGRATION_REFUSED, message)


def failed(name: str, message: str) -> AgentError:
    return AgentError(ErrorCode.MIGRATION_FAILED, f"guest {name!r}: {message}")


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
    work = directory / f"{TLS_PREFIX}{os.getpid()}"
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
        """The connection ended: each guest arriving through it is removed, each one leaving stays."""
        for arriving in self.arriving.values():
            arriving.end(host)
        for leaving in self.leaving.values():
            leaving.end(host)
        self.arriving.clear()
        self.leaving.clear()


def name_of(params: dict[str, Any], extra: set[str] | None = None) -> str:
    check_fields(params, {"name"} | (extra or set()), "params")
    return check_name(params.get("name"))


def flag(params: dict[str, Any], field_name: str, default: bool) -> bool:
    value = params.get(field_name, default)
    if not isinstance(value, bool):
        raise invalid_field(field_name, "must be true or false")
    return value


Method = Callable[[Hypervisor, Store, Sessions, dict[str, Any]], Any]

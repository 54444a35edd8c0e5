"""Guests moved between nodes, orchestrated from the operator's machine: `guest migrate`, `node evacuate`.

The nodes trust nothing of each other and open no port: this client holds an
agent connection to each, asks each for its part (the agent's migration.py),
and relays every byte between them through channels of those connections
(the agent's streams.py): the memory, each disk's mirror (NBD), and the files
copied whole (a stopped guest's disks, a running guest's cloud-init seed,
images the destination lacks).

The order keeps the guest in one place: the destination checks everything
first (dest_check) and nothing moves if it refuses; the source's guest stays
the guest until the destination has taken it (dest_finish commits it there);
only then does the source remove its copy. On any failure before that, the
destination's arrival is removed and the source's guest runs on. The one
moment that cannot be settled from here is a connection lost while the
destination takes the guest: the destination is asked again (a new
connection); if it cannot be reached, the source's guest is left paused, not
resumed, since it may run on the destination already, and the error says so.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from appliance.nodes.client import Node, Relay, read_line
from appliance.nodes.credentials import make_credentials
from appliance.nodes.errors import AgentCallError, ConnectionLostError, NodeError, NodeTimeoutError
from appliance.nodes.relay import pump

CHUNK = 1 << 20
# How long one status request waits on the source before answering (the progress shown is this fresh).
STATUS_WAIT_SECONDS = 1
# What a progress report is: a dict with "phase" (image, file, disks, memory, switch-over, completed)
# and the figures of that phase.
Say = Callable[[dict[str, Any]], None]
Connect = Callable[[], Node]


class MigrationError(NodeError):
    """The migration did not happen, or not all of it; the message says where the guest is now. `code` is
    the agent's when an agent refused (migration_refused, policy_memory, guest_exists, ...)."""

    def __init__(self, message: str, code: str = "migration_failed") -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class MigrationOptions:
    # MiB/s for the memory and each disk's copy (0: QEMU's own limits).
    bandwidth_mib: int = 0
    # --direct: the address the source reaches the destination at; the streams then go straight between
    # the nodes over TCP with TLS (credentials made for this migration alone). Empty: relayed.
    direct_address: str = ""


@dataclass
class Endpoint:
    """One node of the migration: its connection, and how to make another if that one is lost."""

    node: Node
    connect: Connect
    label: str

    def call(self, method: str, params: dict[str, Any]) -> Any:
        try:
            return self.node.call(method, params)
        except AgentCallError as error:
            raise AgentCallError(str(error.code), f"{self.label}: {error.message}", error.details) from error

    def call_again(self, method: str, params: dict[str, Any]) -> Any:
        """On this connection, or a new one when it was lost (its agent then has no session of ours)."""
        try:
            return self.call(method, params)
        except (ConnectionLostError, NodeTimeoutError):
            self.node.close()
            self.node = self.connect()
            return self.call(method, params)

    def close(self) -> None:
        self.node.close()


@dataclass
class Streams:
    """The relay pairs of a live migration (one per stream), each pumped both ways in a thread."""

    relays: list[Relay] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)

    def open(self, source: Endpoint, destination: Endpoint, name: str, stream: str) -> None:
        params = {"name": name, "stream": stream}
        # The destination's end first: the source's QEMU may connect as soon as its end listens.
        inbound = destination.node.open_relay("migration.dest_stream", params)
        self.relays.append(inbound)
        outbound = source.node.open_relay("migration.source_stream", params)
        self.relays.append(outbound)
        thread = threading.Thread(target=pump_pair, args=(outbound, inbound), name=f"stream-{stream}", daemon=True)
        thread.start()
        self.threads.append(thread)

    def close(self) -> None:
        for relay in self.relays:
            relay.channel.close()
        for thread in self.threads:
            thread.join(timeout=5)
        self.relays.clear()
        self.threads.clear()


def pump_pair(outbound: Relay, inbound: Relay) -> None:
    try:
        if inbound.early:
            outbound.channel.sendall(inbound.early)
        if outbound.early:
            inbound.channel.sendall(outbound.early)
    except OSError:
        outbound.channel.close()
        inbound.channel.close()
        return
    pump(outbound.channel, inbound.channel)


class Migration:
    """One guest from `source` to `destination` (see the module's docstring for the order)."""

    def __init__(self, source: Endpoint, destination: Endpoint, name: str, options: MigrationOptions, say: Say):
        self.source, self.destination, self.name = source, destination, name
        self.options, self.say = options, say
        self.streams = Streams()
        self.departure: dict[str, Any] = {}
        self.arriving = False
        self.images_copied: list[str] = []
        self.files_copied: list[str] = []
        self.disk_bytes = 0
        self.taken = False
        self.begun = False
        # Where the guest is after a failure (abort says).
        self.where = f"nothing moved: it stays on {source.label}"

    @property
    def live(self) -> bool:
        return bool(self.departure) and self.departure["state"] != "stopped"

    def run(self) -> dict[str, Any]:
        started = time.monotonic()
        self.departure = self.source.call("migration.source_begin", {"name": self.name})
        try:
            checked = self.destination.call("migration.dest_check", {"departure": self.departure})
            for image in checked["missing_images"]:
                self.copy_image(image)
            self.begun = True
            begun = self.destination.call("migration.dest_begin", {"departure": self.departure})
            self.arriving = True
            for file in begun["files"]:
                self.copy_file(file)
            status = self.move_live() if self.live else {}
            switching = time.monotonic()
            taken = self.take()
        except BaseException:
            self.abort()
            raise
        finally:
            self.streams.close()
        switchover = time.monotonic() - switching
        self.leave()
        memory = status.get("memory", {})
        return {
            "name": self.name,
            "from": self.source.label,
            "to": self.destination.label,
            "live": self.live,
            "route": ("direct" if self.options.direct_address else "relayed") if self.live else "relayed",
            "state": "running" if taken.get("resumed") else "paused" if self.live else "stopped",
            "seconds": round(time.monotonic() - started, 3),
            "downtime_ms": status.get("downtime_ms"),
            "switchover_ms": round(switchover * 1000) if self.live else None,
            "memory_bytes": memory.get("transferred"),
            "disk_bytes": self.disk_bytes,
            "images_copied": self.images_copied,
            "files_copied": self.files_copied,
            **({"resume_error": taken["resume_error"]} if "resume_error" in taken else {}),
        }

    def copy_image(self, image: str) -> None:
        """An image the guest uses, from the source's store into the destination's (image.import there)."""
        sending = self.source.node.open_relay("migration.send_file", {"image": image})
        try:
            size, sha256 = int(sending.result["size"]), str(sending.result["sha256"])

            def said(sent: int, total: int) -> None:
                self.say({"phase": "image", "image": image, "sent": sent, "size": total})

            self.destination.node.import_image_from(image, size, sha256, relay_reader(sending), said)
        finally:
            sending.channel.close()
        self.images_copied.append(image)

    def copy_file(self, file: str) -> None:
        """One file of the guest, whole, checked by the destination before it is put in place."""
        sending = self.source.node.open_relay("migration.send_file", {"name": self.name, "file": file})
        try:
            size, sha256 = int(sending.result["size"]), str(sending.result["sha256"])
            params = {"name": self.name, "file": file, "size": size, "sha256": sha256}
            receiving = self.destination.node.open_relay("migration.receive_file", params)
            try:
                read = relay_reader(sending)
                sent = 0
                while sent < size:
                    block = read(min(CHUNK, size - sent))
                    if not block:
                        raise ConnectionLostError(f"{self.source.label} stopped sending {file} after {sent} bytes")
                    receiving.channel.sendall(block)
                    sent += len(block)
                    self.say({"phase": "file", "file": file, "sent": sent, "size": size})
                receiving.channel.settimeout(self.destination.node.timeout)
                answer(receiving, self.destination.label)
            except OSError as error:
                raise ConnectionLostError(f"copying {file}: {error}") from error
            finally:
                receiving.channel.close()
        finally:
            sending.channel.close()
        self.files_copied.append(file)

    def move_live(self) -> dict[str, Any]:
        """The destination's QEMU waiting, a stream pair per disk and one for the memory, then the source
        mirrors and migrates; its status is followed (and shown) until QEMU says completed. Direct: the
        destination listens on TCP ports with TLS, and the source connects there with its own credentials."""
        start: dict[str, Any] = {"name": self.name, "bandwidth_mib": self.options.bandwidth_mib}
        address = self.options.direct_address
        if address:
            credentials = make_credentials(address)
            listening = self.destination.call(
                "migration.dest_listen", {"name": self.name, "direct": {"tls": credentials.server()}}
            )
            start["direct"] = {"tls": credentials.client(), "address": address, "ports": listening["ports"]}
        else:
            listening = self.destination.call("migration.dest_listen", {"name": self.name})
            for stream in listening["streams"]:
                self.streams.open(self.source, self.destination, self.name, stream)
        status: dict[str, Any] = self.source.call("migration.source_start", start)
        while status["phase"] != "completed":
            self.say(status)
            self.disk_bytes = sum(disk["total"] for disk in status["disks"]) or self.disk_bytes
            # Still there? A destination gone is a migration to stop now, not after the source is done.
            self.destination.call("migration.dest_status", {"name": self.name})
            status = self.source.call("migration.source_status", {"name": self.name, "wait": STATUS_WAIT_SECONDS})
        self.say(status)
        return status

    def take(self) -> dict[str, Any]:
        """The destination takes the guest (commits it, and resumes it unless it was paused)."""
        resume = self.departure["state"] == "running"
        try:
            taken: dict[str, Any] = self.destination.call(
                "migration.dest_finish", {"name": self.name, "resume": resume}
            )
        except (ConnectionLostError, NodeTimeoutError):
            # Whether it took the guest before the connection went: only it can say.
            if self.settle_destination() is not True:
                raise
            self.taken, self.arriving = True, False
            taken = {"resumed": False}
            if resume:
                try:
                    self.destination.call_again("guest.resume", {"name": self.name})
                    taken["resumed"] = True
                except NodeError as error:  # it is the destination's all the same: said, never undone
                    taken["resume_error"] = str(error)
        self.taken, self.arriving = True, False
        return taken

    def leave(self) -> None:
        """The guest is the destination's: the source's QEMU, definition and disks go."""
        try:
            self.source.call_again("migration.source_finish", {"name": self.name})
        except NodeError as error:
            raise MigrationError(
                f"{self.name} now runs on {self.destination.label}, but {self.source.label} could not remove its "
                f"copy ({error}): it is paused there; remove it with `appliance guest delete {self.source.label} "
                f"{self.name} --force --remove-disks`"
            ) from error

    def settle_destination(self) -> bool | None:
        """The arrival removed from the destination; whether the destination has the guest (None: it
        could not be asked)."""
        if not self.arriving:
            return False
        try:
            answer = self.destination.call_again("migration.dest_abort", {"name": self.name})
        except NodeError:
            return None
        return bool(answer["defined"])

    def abort(self) -> None:
        """After a failure: the destination's arrival goes, the source's guest stays (and runs again if QEMU
        had paused it at the end, once it is sure the destination did not take it); `where` says which."""
        self.streams.close()
        source, destination = self.source.label, self.destination.label
        if self.taken:  # the destination has the guest: the source's copy must never run again
            self.where = f"it is on {destination}; its copy on {source} is left paused"
            return
        settled = self.settle_destination()
        resume = settled is False and self.departure.get("state") == "running"
        try:
            state = self.source.call_again("migration.source_abort", {"name": self.name, "resume": resume})["state"]
        except NodeError as failure:
            self.where = f"{source} could not be told to keep it ({failure}): see `appliance guest info` there"
            return
        if settled is None and state == "postmigrate":
            self.where = (
                f"it is paused on {source}, and {destination} could not be asked whether it took it: see "
                f"`appliance guest info` on both before resuming it on one"
            )
        elif settled is None:
            self.where = (
                f"it stays on {source} ({state}); {destination} could not be reached to remove what was made "
                "there (its agent removes it when its connection ends, or the next agent does)"
            )
        elif not self.begun and not self.images_copied:
            self.where = f"nothing moved: it stays on {source}"
        else:
            self.where = f"it stays on {source} ({state}), and nothing of it is left on {destination}"
            if self.images_copied:
                self.where += f" but the images copied there first ({', '.join(self.images_copied)})"


def relay_reader(relay: Relay) -> Callable[[int], bytes]:
    """`read(at_most)` over a relay: what came with its answer first, then the channel."""
    early = [relay.early]

    def read(at_most: int) -> bytes:
        if early[0]:
            block, early[0] = early[0][:at_most], early[0][at_most:]
            return block
        return bytes(relay.channel.recv(at_most))

    return read


def answer(relay: Relay, label: str) -> Any:
    """The one JSON line a relay ends with (migration.receive_file's)."""
    try:
        line, _ = read_line(relay.channel, relay.early)
        reply = json.loads(line)
    except (OSError, EOFError, ValueError) as error:
        raise ConnectionLostError(f"{label} gave no answer after the data: {error}") from error
    if "error" in reply:
        data = reply["error"].get("data") or {}
        raise AgentCallError(str(data.get("code", "unknown")), f"{label}: {reply['error'].get('message', '')}")
    return reply["result"]


def migrate_guest(
    source: Endpoint, destination: Endpoint, name: str, options: MigrationOptions, say: Say
) -> dict[str, Any]:
    migration = Migration(source, destination, name, options, say)
    try:
        return migration.run()
    except MigrationError:
        raise
    except AgentCallError as error:
        raise MigrationError(f"{name}: {error.message}; {migration.where}", str(error.code)) from error
    except NodeError as error:
        raise MigrationError(f"{name}: {error}; {migration.where}") from error


def evacuate(source: Endpoint, destination: Endpoint, options: MigrationOptions, say: Say) -> list[dict[str, Any]]:
    """Every guest of the source moved to the destination, one at a time; one failing does not stop the
    others (each outcome says)."""
    outcomes: list[dict[str, Any]] = []
    for guest in source.call("guest.list", {}):
        name = str(guest["name"])
        say({"phase": "guest", "name": name})
        try:
            outcomes.append({"name": name, "ok": True, **migrate_guest(source, destination, name, options, say)})
        except NodeError as error:
            outcomes.append({"name": name, "ok": False, "code": str(error.code), "reason": str(error)})
    return outcomes

"""Agents behind real OpenSSH sshds on 127.0.0.1 (tests/sshd.py): round-trips and fleet fan-out."""

from __future__ import annotations

import statistics
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from figures import Section, median_text, seconds, summary, timed
from helpers.agent_process import AgentProcess
from helpers.keys import make_key
from helpers.sshd import Sshd
from round_trips import RoundTrips, connect_first_samples, open_channel_samples

from appliance.nodes.client import Node, NodeAddress
from appliance.nodes.fleet import DEFAULT_CONCURRENCY, HostEntry, fan_out
from appliance.progress import Progress

USER = "root"  # tests/sshd.py reads one authorized_keys for every user; the forced command is the agent


@contextmanager
def sshd_endpoints(directory: Path, count: int, public_key: str) -> Iterator[list[Sshd]]:
    """`count` sshds on free loopback ports, each forcing its own agent (own state dir); all stopped after."""
    with ExitStack() as stack:
        endpoints: list[Sshd] = []
        for index in range(count):
            node_dir = directory / f"sshd-{index}"
            endpoint = Sshd(node_dir, public_key, node_dir / "state")
            endpoint.start()
            stack.callback(endpoint.stop)
            endpoints.append(endpoint)
        yield endpoints


def write_known_hosts(endpoints: list[Sshd], path: Path) -> Path:
    """Every endpoint's host key recorded up front: no first-contact writes while timing (or racing)."""
    lines = [
        f"[127.0.0.1]:{endpoint.port} {' '.join(endpoint.host_key.with_suffix('.pub').read_text().split()[:2])}"
        for endpoint in endpoints
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def node_for(endpoint: Sshd, key: Path, known_hosts: Path) -> Node:
    return Node(NodeAddress("127.0.0.1", endpoint.port, USER), key, known_hosts, strict=True, timeout=60)


def measure_pipe(work: Path, count: int) -> RoundTrips:
    """The agent on its own pipes, no SSH: what the protocol and the agent cost by themselves."""
    agent = AgentProcess(work / "pipe-agent" / "state")
    try:
        samples = open_channel_samples(agent.result, count)
    finally:
        agent.kill()
    return RoundTrips("agent on a pipe, no SSH (reference)", open_channel=samples)


def measure_loopback(work: Path, progress: Progress, rtt_count: int, connect_count: int) -> list[RoundTrips]:
    key = make_key(work, "loopback-operator")
    with sshd_endpoints(work / "loopback", 1, key.with_suffix(".pub").read_text().strip()) as (endpoint,):
        known_hosts = write_known_hosts([endpoint], work / "loopback" / "known_hosts")
        with progress.step(f"loopback sshd: {rtt_count} requests on one channel, {connect_count} connects"):
            with node_for(endpoint, key, known_hosts) as node:
                open_channel = open_channel_samples(node.call, rtt_count)
            connects = connect_first_samples(lambda: node_for(endpoint, key, known_hosts), connect_count)
    with progress.step(f"agent over a pipe: {rtt_count} requests"):
        pipe = measure_pipe(work, rtt_count)
    return [RoundTrips("SSH, loopback sshd on this host", open_channel, connects), pipe]


def measure_fleet(work: Path, progress: Progress, sizes: list[int], runs: int) -> Section:
    section = Section("fleet", "7. fleet report: host.report from N nodes (sshd endpoints on loopback)")
    key = make_key(work, "fleet-operator")
    largest = max(sizes)
    progress.note(f"starting {largest} sshd endpoints on loopback")
    with sshd_endpoints(work / "fleet", largest, key.with_suffix(".pub").read_text().strip()) as endpoints:
        known_hosts = write_known_hosts(endpoints, work / "fleet" / "known_hosts")
        for size in sizes:
            entries = [
                HostEntry(f"node{index}", NodeAddress("127.0.0.1", endpoint.port, USER))
                for index, endpoint in enumerate(endpoints[:size])
            ]

            def connect(address: NodeAddress) -> Node:
                return Node(address, key, known_hosts, strict=True, timeout=120)

            def report(entries: list[HostEntry] = entries) -> None:
                failed = [outcome for outcome in fan_out(entries, "host.report", connect) if not outcome.ok]
                if failed:
                    raise RuntimeError(f"{len(failed)} of {len(entries)} nodes failed: {failed[0].reason}")

            with progress.step(f"fleet report against {size} nodes, {runs} runs"):
                samples = [timed(report) for _ in range(runs)]
            section.data[f"n{size}"] = {"nodes": size, "concurrency": DEFAULT_CONCURRENCY, **summary(samples)}
            section.add(
                f"fleet report, N={size}",
                median_text(samples),
                f"{seconds(statistics.median(samples) / size)} per node; fan-out {min(size, DEFAULT_CONCURRENCY)}",
            )
    section.data["note"] = "each node is an sshd on 127.0.0.1 forcing its own agent; one fresh SSH connection per node"
    return section

"""Is this boot healthy? What a trial boot must pass before its slot becomes the default.

Built in: the data partition is mounted, the agent answers (as its own user,
as SSH would run it: agent.hello and the guests' list), sshd is listening,
and every autostart guest is running. Then the operator's own checks from
the spec ([upgrade] health_checks, run with /bin/sh as root, as greenboot runs
its required.d scripts): each must exit 0 within CHECK_SECONDS.
"""

from __future__ import annotations

import json
import pwd
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHECK_SECONDS = 30
POLL_SECONDS = 3.0
STORAGE_MARKER = Path("/run/appliance/storage")
AGENT = "/usr/bin/appliance-agent"


@dataclass(frozen=True)
class CheckResult:
    name: str
    ok: bool
    detail: str = ""


Check = Callable[[], CheckResult]


def data_partition(marker: Path = STORAGE_MARKER) -> CheckResult:
    try:
        storage = marker.read_text().strip()
    except OSError:
        storage = "not decided yet"
    return CheckResult("data partition", storage == "persistent", f"state storage: {storage}")


def sshd_listening(port: int = 22, host: str = "127.0.0.1") -> CheckResult:
    try:
        with socket.create_connection((host, port), timeout=5) as connection:
            banner = connection.recv(64)
    except OSError as error:
        return CheckResult("sshd", False, f"nothing answers on port {port}: {error.strerror or error}")
    ok = banner.startswith(b"SSH-")
    return CheckResult("sshd", ok, "" if ok else f"port {port} answers {banner[:20]!r}, not SSH")


def agent_session(argv: Sequence[str], requests: list[tuple[str, dict[str, Any]]]) -> list[Any]:
    """Results of REQUESTS sent to `appliance-agent serve` run by ARGV; an error reply raises."""
    lines = "".join(
        json.dumps({"jsonrpc": "2.0", "id": index, "method": method, "params": params}) + "\n"
        for index, (method, params) in enumerate(requests)
    )
    done = subprocess.run(list(argv), input=lines, capture_output=True, text=True, timeout=CHECK_SECONDS, check=False)
    replies = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    if len(replies) != len(requests):
        raise RuntimeError(
            f"the agent answered {len(replies)} of {len(requests)} requests: {done.stderr.strip()[-200:]}"
        )
    for reply in replies:
        if "error" in reply:
            raise RuntimeError(f"the agent answered an error: {reply['error'].get('message')}")
    return [reply["result"] for reply in replies]


def agent_command(user: str) -> list[str]:
    """The agent as its user, with the environment an SSH login gives it (its systemd manager's runtime dir)."""
    uid = pwd.getpwnam(user).pw_uid
    return ["runuser", "-u", user, "--", "env", f"XDG_RUNTIME_DIR=/run/user/{uid}", AGENT, "serve"]


def agent_and_guests(argv: Sequence[str]) -> list[CheckResult]:
    """The agent answers; and every autostart guest runs (asked of the agent, as an operator would)."""
    try:
        hello, guests = agent_session(argv, [("agent.hello", {}), ("guest.list", {})])
        infos = agent_session(argv, [("guest.info", {"name": guest["name"]}) for guest in guests]) if guests else []
    except (OSError, ValueError, RuntimeError, subprocess.TimeoutExpired, KeyError) as error:
        return [
            CheckResult("agent", False, str(error)),
            CheckResult("autostart guests", False, "the agent did not say"),
        ]
    stopped = [
        info["name"] for info in infos if info.get("definition", {}).get("autostart") and info.get("state") != "running"
    ]
    return [
        CheckResult("agent", True, f"protocol {hello.get('protocol')}"),
        CheckResult("autostart guests", not stopped, f"not running: {', '.join(stopped)}" if stopped else ""),
    ]


def operator_check(command: str) -> CheckResult:
    name = f"check `{command}`"
    try:
        done = subprocess.run(
            ["/bin/sh", "-c", command], capture_output=True, text=True, timeout=CHECK_SECONDS, check=False
        )
    except subprocess.TimeoutExpired:
        return CheckResult(name, False, f"still running after {CHECK_SECONDS}s")
    except OSError as error:
        return CheckResult(name, False, str(error))
    said = (done.stderr.strip() or done.stdout.strip())[-200:]
    return CheckResult(name, done.returncode == 0, f"exit {done.returncode}{': ' + said if said else ''}")


def node_checks(agent_user: str, operator_checks: Sequence[str]) -> Callable[[], list[CheckResult]]:
    """Every check of this node, in order, as one round."""

    def round_of_checks() -> list[CheckResult]:
        results = [data_partition(), *agent_and_guests(agent_command(agent_user)), sshd_listening()]
        return results + [operator_check(command) for command in operator_checks]

    return round_of_checks


@dataclass(frozen=True)
class Verdict:
    healthy: bool
    seconds: float
    failed: tuple[CheckResult, ...]  # the last round's failures

    @property
    def reason(self) -> str:
        return "; ".join(f"{result.name}: {result.detail}" if result.detail else result.name for result in self.failed)


def wait_healthy(
    checks: Callable[[], list[CheckResult]],
    timeout: float,
    say: Callable[[str], None] = lambda line: None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Verdict:
    """Rounds of CHECKS until one passes whole, or TIMEOUT seconds have gone by."""
    started = clock()
    last_said = ""
    while True:
        failed = tuple(result for result in checks() if not result.ok)
        elapsed = clock() - started
        if not failed:
            return Verdict(True, elapsed, ())
        summary = ", ".join(result.name for result in failed)
        if summary != last_said:
            say(f"not healthy yet after {elapsed:.0f}s: {summary}")
            last_said = summary
        if elapsed >= timeout:
            return Verdict(False, elapsed, failed)
        sleep(min(POLL_SECONDS, max(0.0, timeout - elapsed)))

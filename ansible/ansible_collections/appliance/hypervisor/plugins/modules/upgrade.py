#!/usr/bin/python
"""The upgrade module: a node running (or armed to try) a given build, as `appliance upgrade` does it."""

from __future__ import annotations

DOCUMENTATION = r"""
module: upgrade
short_description: An appliance node upgraded to a build, with automatic rollback
version_added: 0.2.0
description:
  - Writes a build directory (made by C(appliance build) on the controller) into the root slot the node does not
    run, over the node's agent, and arms one trial boot of it, as C(appliance upgrade) does.
  - The build is checked against its C(manifest.json) first; only the files the node does not hold yet are sent, and
    the node checks each one's sha256.
  - With O(reboot) the node reboots into the trial and the task waits until the node has judged it (its health checks,
    the spec's C([upgrade])). Blessed, the new build is the default; rolled back, the node runs the build it ran
    before and the task fails with code C(rolled_back) and the node's reason.
  - Idempotent. A node that runs the build already is left alone; without O(reboot), a node that has the build
    written and armed already is left alone too.
extends_documentation_fragment:
  - appliance.hypervisor.node
  - appliance.hypervisor.node.attributes
  - ansible.builtin.action_common_attributes
  - ansible.builtin.action_common_attributes.flow
attributes:
  check_mode:
    support: full
    details: The build is checked and compared with the build the node runs and the one it has armed; nothing is sent.
  diff_mode:
    support: full
    details: The node's running build (and armed one) before and after.
options:
  src:
    description: The build directory on the controller (holds C(manifest.json), the kernel, initrd and squashfs).
    type: path
    required: true
  reboot:
    description:
      - Reboot into the trial once the slot is written, and wait for the node's verdict.
      - Without it the build is written and armed; the node tries it on its next reboot.
    type: bool
    default: true
  stop_guests:
    description:
      - Stop the node's running guests (ACPI, then forced after O(stop_timeout) seconds) once the slot is written.
      - Without it, a node with running guests refuses the upgrade (code C(guests_running)) before a byte is sent.
    type: bool
    default: false
  stop_timeout:
    description: Seconds a guest has to power down on ACPI before it is forced off (with O(stop_guests)).
    type: int
    default: 120
  wait_timeout:
    description: Seconds to wait, after the reboot, for the node to judge the trial.
    type: int
    default: 900
seealso:
  - module: appliance.hypervisor.node_info
author:
  - The appliance project (!UNKNOWN)
"""

EXAMPLES = r"""
- name: Every node on the new build, one at a time (a rollback fails the node and stops the play there)
  hosts: hypervisors
  connection: local
  gather_facts: false
  serial: 1
  max_fail_percentage: 0
  tasks:
    - appliance.hypervisor.upgrade:
        src: out/
        stop_guests: true

- name: Written and armed now, tried at the next maintenance reboot
  appliance.hypervisor.upgrade:
    src: out/
    reboot: false
"""

RETURN = r"""
build_id:
  description: The build of O(src).
  returned: always
  type: str
  sample: appliance-20261125T120000Z-1a2b3c4d
running:
  description: The build the node runs after the task (before it, in check mode or without O(reboot)).
  returned: always
  type: str
slot:
  description: The slot the build was written to (or holds it).
  returned: when the build was written or found armed
  type: str
  sample: b
sent_bytes:
  description: Bytes sent to the node (files it held already are not sent again).
  returned: always
  type: int
result:
  description: The node's verdict on the trial, C(blessed); or C(armed) without O(reboot), C(running) when the node ran
    the build already. In check mode, C(armed) without O(reboot), and empty with it (the verdict is the node's).
  returned: success
  type: str
seconds:
  description: Seconds of each step (C(push), C(write), and after a reboot the node's own C(verdict) and figures).
  returned: when the build was written
  type: dict
stopped_guests:
  description: The guests stopped for the upgrade (O(stop_guests)).
  returned: always
  type: list
  elements: str
code:
  description: The failure's stable code (C(rolled_back), C(upgrade_failed), the agent's, or the client's).
  returned: failed
  type: str
  sample: rolled_back
details:
  description: The agent's error data.
  returned: failed
  type: dict
"""

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.appliance.hypervisor.plugins.module_utils.node import (
    ModuleFailure,
    NodeSession,
    node_argument_spec,
    run_module,
)

try:
    from appliance.errors import ApplianceError
    from appliance.nodes.client import Node, NodeAddress
    from appliance.nodes.upgrade import (
        UpgradeBuild,
        UpgradeOptions,
        UpgradeOutcome,
        await_verdict,
        load_build,
        reboot,
        upgrade_node,
    )
except ImportError:  # run_module fails the task saying what is missing before any of these is used
    pass

# Sending a squashfs and writing a slot take minutes on a slow node: the same bound as `appliance upgrade`'s.
UPGRADE_TIMEOUT = 300.0

ARGUMENT_SPEC = node_argument_spec(
    src={"type": "path", "required": True},
    reboot={"type": "bool", "default": True},
    stop_guests={"type": "bool", "default": False},
    stop_timeout={"type": "int", "default": 120},
    wait_timeout={"type": "int", "default": 900},
)


def node_builds(session: NodeSession) -> tuple[str, str, str]:
    """The build the node runs, the slot armed for a trial and its build ("" when none is)."""
    report = session.call("host.report", idempotent=True)
    running = str(report.get("build_id", ""))
    slots = report.get("slots") or {}
    armed = str(slots.get("armed") or "")
    armed_build = str(((slots.get("slots") or {}).get(armed) or {}).get("build_id", "")) if armed else ""
    return running, armed, armed_build


def load(src: Path) -> UpgradeBuild:
    try:
        return load_build(src)
    except ApplianceError as error:  # no build there, or files that do not match its manifest
        raise ModuleFailure(str(error.code), str(error)) from error


def run(module: AnsibleModule, session: NodeSession) -> dict[str, Any]:
    params = module.params
    build = load(Path(params["src"]))
    wanted = build.manifest.build_id
    running, armed_slot, armed = node_builds(session)
    result: dict[str, Any] = {"changed": False, "build_id": wanted, "running": running, "sent_bytes": 0,
                              "stopped_guests": []}  # fmt: skip
    if module._diff:
        result["diff"] = {"before": {"running": running, "armed": armed}}
    settled = running == wanted or (armed == wanted and not params["reboot"])
    if settled or module.check_mode:
        if running == wanted:
            verdict = "running"
        elif settled or not params["reboot"]:
            verdict = "armed"  # or, in check mode, what this run would leave
        else:
            verdict = ""  # the node's own verdict, which check mode cannot predict
        result.update(changed=not settled, result=verdict)
        if settled and running != wanted:
            result["slot"] = armed_slot
        if module._diff:
            after = {"running": wanted, "armed": ""} if params["reboot"] else {"running": running, "armed": wanted}
            result["diff"]["after"] = result["diff"]["before"] if settled else after
        return result
    options = UpgradeOptions(
        stop_guests=params["stop_guests"],
        stop_timeout=params["stop_timeout"],
        reboot=params["reboot"],
        wait=float(params["wait_timeout"]) if params["reboot"] else 0.0,
    )
    connect = session.connector(max(session.timeout, UPGRADE_TIMEOUT))
    said: list[str] = []
    outcome = upgrade_node(connect, session.address, build, options, said.append)
    result.update(
        changed=not outcome.noop or options.reboot,
        slot=outcome.slot,
        sent_bytes=outcome.sent_bytes,
        stopped_guests=outcome.stopped_guests,
        seconds=outcome.seconds,
        result=outcome.result or "armed",
        running=wanted if outcome.result == "blessed" else running,
    )
    if outcome.noop and options.reboot:
        # Armed by an earlier run that did not reboot: this one reboots into the trial and waits, as a first run does.
        result.update(changed=True, result=reboot_armed(connect, session, outcome, running, options))
        result["running"] = wanted
    if said:
        result["messages"] = said
    if module._diff:
        result["diff"]["after"] = {"running": result["running"], "armed": "" if params["reboot"] else wanted}
    return result


def reboot_armed(
    connect: Callable[[NodeAddress], Node],
    session: NodeSession,
    outcome: UpgradeOutcome,
    running: str,
    options: UpgradeOptions,
) -> str:
    reboot(session.node, outcome)
    await_verdict(connect, session.address, outcome, running, options.wait, lambda _: None)
    return outcome.result


def main() -> None:
    module = AnsibleModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=True)
    run_module(module, lambda session: run(module, session))


if __name__ == "__main__":
    main()

#!/usr/bin/python
"""The guest module: a guest's definition and power state on an appliance node."""

from __future__ import annotations

DOCUMENTATION = r"""
module: guest
short_description: Guests on an appliance node, defined, started, stopped, restarted or removed
version_added: 0.1.0
description:
  - Makes a guest on an appliance hypervisor node what the task says, through the node's agent over SSH.
  - O(state=present) creates the guest, or updates its definition (C(guest.update)), without touching its power
    state, as C(ovirt.ovirt.ovirt_vm) does. V(running), V(stopped) and V(restarted) do the same, then set the
    power state.
  - Only the options given are compared and changed; an option left out keeps what the node has.
    The module reports C(changed) only when the node's definition or power state really differs.
  - A definition change to a running guest takes effect at its next start (CPU limits at once); the module says so
    in RV(restart_needed) and a warning. O(state=restarted) applies it.
  - Disks cannot change through an update; a task whose O(disks) differ from the guest's fails (code C(unsupported)).
extends_documentation_fragment:
  - appliance.hypervisor.node
  - appliance.hypervisor.node.attributes
  - ansible.builtin.action_common_attributes
  - ansible.builtin.action_common_attributes.flow
attributes:
  check_mode:
    support: full
    details: Predicts the definition and power state without changing anything. The node's own checks
      (its policy, its bridges) are only made when the change is really made.
  diff_mode:
    support: full
    details: The definition and power state before and after.
options:
  name:
    description: The guest's name (1-63 letters, digits, C(_), C(.), C(-)).
    type: str
    required: true
  state:
    description:
      - V(present) defines the guest (created, or updated to the options given), leaving its power state alone.
      - V(running) and V(stopped) define it, then start it (a paused guest is resumed) or stop it.
      - V(restarted) defines it, then stops it (an ACPI power-down, forced off after O(timeout); with O(force),
        at once) and starts it again; a stopped guest is started. It always reports C(changed).
      - V(absent) removes the guest, stopping it first (as V(stopped) does) when it runs.
    type: str
    choices: [present, running, stopped, restarted, absent]
    default: present
  vcpus:
    description: Virtual CPUs. The node's default when the guest is created without it is 1.
    type: int
  memory_mib:
    description: Memory in MiB (at least 16). Needed to create a guest.
    type: int
  disks:
    description:
      - The guest's disks, in order. Given when the guest is created; compared after that, never changed
        (a difference fails, code C(unsupported)).
    type: list
    elements: dict
    suboptions:
      size_gib:
        description: A blank disk of this many GiB.
        type: int
      base_image:
        description:
          - A copy-on-write disk over this image from the node's image store (see M(appliance.hypervisor.image)).
        type: str
  nics:
    description:
      - The guest's NICs, in order (at most 8); V([]) for none.
      - A NIC given without O(nics[].mac) keeps the MAC the node gave the NIC at its place (the node derives one
        for a new NIC), so such a definition does not look changed.
    type: list
    elements: dict
    suboptions:
      bridge:
        description: A bridge on the node (one its agent allows) for the NIC.
        type: str
      user:
        description: User-mode NAT (passt) instead of a bridge.
        type: bool
      vlan:
        description: A VLAN id (1-4094) on a VLAN-aware bridge.
        type: int
      mac:
        description: The NIC's MAC address; derived by the node when not given.
        type: str
      model:
        description: The NIC model QEMU emulates.
        type: str
        choices: [virtio, e1000, rtl8139]
        default: virtio
  kernel_boot:
    description:
      - Boot a kernel from the image store directly. V({}) removes it.
    type: dict
    suboptions:
      kernel_image:
        description: The kernel's image name.
        type: str
      initrd_image:
        description: The initrd's image name.
        type: str
      cmdline:
        description: The kernel command line.
        type: str
  autostart:
    description: Start the guest when the node boots.
    type: bool
  restart:
    description: What the node does when the guest stops by itself.
    type: str
    choices: [never, on-failure, always]
  cpu_weight:
    description: CPU share against other guests (1-10000; the node's default is 100).
    type: int
  cpu_quota_percent:
    description: A hard CPU limit in percent of one CPU (0 for none; at most 100 per vCPU).
    type: int
  cloud_init:
    description:
      - A NoCloud seed for cloud-init in the guest, given to it at its next start. V({}) removes it.
    type: dict
    suboptions:
      hostname:
        description: The guest's host name (the guest's name by default).
        type: str
      ssh_authorized_keys:
        description: OpenSSH public key lines for the default user.
        type: list
        elements: str
      user:
        description: The name the image's default user takes.
        type: str
      user_data:
        description: A C(#cloud-config) document (at most 64 KiB).
        type: str
      network_config:
        description: A network config version 2, as a mapping or as YAML text.
        type: raw
      vendor_data:
        description: A C(#cloud-config) document or a C(#!) script.
        type: str
  force:
    description:
      - Power the guest off at once (no ACPI power-down) where a state change stops it
        (V(stopped), V(restarted), V(absent)).
    type: bool
    default: false
  remove_disks:
    description:
      - With O(state=absent), remove the guest's disks too. Without it the node keeps them aside with the
        definition (C(kept.list), C(kept.restore)).
    type: bool
    default: false
  wait:
    description:
      - Wait until the node reports the power state asked for (V(running) after a start), up to O(timeout) seconds.
      - A stop always waits for the guest's ACPI power-down, up to O(timeout), before forcing it off.
    type: bool
    default: true
  timeout:
    description: Seconds for a state change (the ACPI power-down's grace before the guest is forced off, and the wait).
    type: int
    default: 120
seealso:
  - module: appliance.hypervisor.guest_info
  - module: appliance.hypervisor.image
author:
  - The appliance project (!UNKNOWN)
"""

EXAMPLES = r"""
- name: Guests on every node
  hosts: hypervisors
  connection: local
  gather_facts: false
  tasks:
    - name: A web guest, running
      appliance.hypervisor.guest:
        name: web
        state: running
        vcpus: 2
        memory_mib: 2048
        disks:
          - base_image: debian-13
          - size_gib: 20
        nics:
          - bridge: br0
            vlan: 10
        cloud_init:
          ssh_authorized_keys:
            - "{{ lookup('file', '~/.ssh/id_ed25519.pub') }}"
        autostart: true
        restart: on-failure

    - name: More memory at its next start
      appliance.hypervisor.guest:
        name: web
        memory_mib: 4096

    - name: Gone, disks and all, without waiting for a shutdown
      appliance.hypervisor.guest:
        name: old
        state: absent
        force: true
        remove_disks: true
"""

RETURN = r"""
state:
  description: The guest's power state after the task (predicted in check mode); V(absent) when it is gone.
  returned: always
  type: str
  sample: running
definition:
  description: The guest's definition after the task (predicted in check mode), in the shape C(guest.create) takes.
  returned: when the guest exists after the task
  type: dict
  sample:
    vcpus: 1
    memory_mib: 32
    disks: [{base_image: marker}]
    nics: [{user: true, mac: "52:1a:2b:3c:4d:5e", model: virtio}]
    kernel_boot: null
    autostart: false
    restart: never
    cpu_weight: 100
    cpu_quota_percent: 0
    cloud_init: null
changed_fields:
  description: The definition's fields the task changed.
  returned: always
  type: list
  elements: str
  sample: [memory_mib]
restart_needed:
  description: The guest runs with an older definition; the changes take effect at its next start.
  returned: always
  type: bool
  sample: false
guest:
  description: The agent's C(guest.info) after the task (not in check mode).
  returned: when the guest exists after the task, not in check mode
  type: dict
disks_kept_in:
  description: Where the node keeps a removed guest's disks (null with O(remove_disks)).
  returned: when the task removed the guest, not in check mode
  type: str
code:
  description: The failure's stable code (the agent's, or the client's such as C(connection_failed)).
  returned: failed
  type: str
  sample: guest_running
details:
  description: The agent's error data, such as the C(field) a refusal names.
  returned: failed
  type: dict
"""

from typing import Any

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.appliance.hypervisor.plugins.module_utils import definition
from ansible_collections.appliance.hypervisor.plugins.module_utils.node import (
    ModuleFailure,
    NodeSession,
    node_argument_spec,
    run_module,
)

CPU_FIELDS = {"cpu_weight", "cpu_quota_percent"}

ARGUMENT_SPEC = node_argument_spec(
    name={"type": "str", "required": True},
    state={"type": "str", "default": "present", "choices": ["present", "running", "stopped", "restarted", "absent"]},
    vcpus={"type": "int"},
    memory_mib={"type": "int"},
    disks={
        "type": "list",
        "elements": "dict",
        "options": {"size_gib": {"type": "int"}, "base_image": {"type": "str"}},
        "mutually_exclusive": [["size_gib", "base_image"]],
        "required_one_of": [["size_gib", "base_image"]],
    },
    nics={
        "type": "list",
        "elements": "dict",
        "options": {
            "bridge": {"type": "str"},
            "user": {"type": "bool"},
            "vlan": {"type": "int"},
            "mac": {"type": "str"},
            "model": {"type": "str", "default": "virtio", "choices": ["virtio", "e1000", "rtl8139"]},
        },
    },
    kernel_boot={
        "type": "dict",
        "options": {"kernel_image": {"type": "str"}, "initrd_image": {"type": "str"}, "cmdline": {"type": "str"}},
    },
    autostart={"type": "bool"},
    restart={"type": "str", "choices": ["never", "on-failure", "always"]},
    cpu_weight={"type": "int"},
    cpu_quota_percent={"type": "int"},
    cloud_init={
        "type": "dict",
        "options": {
            "hostname": {"type": "str"},
            "ssh_authorized_keys": {"type": "list", "elements": "str", "no_log": False},
            "user": {"type": "str"},
            "user_data": {"type": "str"},
            "network_config": {"type": "raw"},
            "vendor_data": {"type": "str"},
        },
    },
    force={"type": "bool", "default": False},
    remove_disks={"type": "bool", "default": False},
    wait={"type": "bool", "default": True},
    timeout={"type": "int", "default": 120},
)


class GuestTask:
    """One task's work on one guest: the definition first, then the power state."""

    def __init__(self, module: AnsibleModule, session: NodeSession) -> None:
        self.module = module
        self.session = session
        self.params = module.params
        self.name: str = module.params["name"]
        self.check = module.check_mode
        self.timeout = float(module.params["timeout"])
        self.changed = False
        self.changed_fields: list[str] = []
        self.restart_needed = False

    def run(self) -> dict[str, Any]:
        info = self.session.guest_info(self.name)
        before_definition = None if info is None else definition.stored(info["definition"])
        before_state = "absent" if info is None else info["state"]
        outcome: dict[str, Any] = {}
        if self.params["state"] == "absent":
            after_definition, after_state = None, "absent"
            if info is not None:
                outcome = self.remove(info)
        else:
            after_definition, info = self.define(info, before_definition)
            # A guest only predicted (check mode) would be created stopped.
            after_state = self.set_power("stopped" if info is None else info["state"])
        if not self.check and after_state != "absent":
            info = self.session.guest_info(self.name)
            if info is not None:
                after_definition, after_state = definition.stored(info["definition"]), info["state"]
                outcome["guest"] = info
        if self.restart_needed and after_state != "stopped":
            self.module.warn(f"guest {self.name!r} runs with its former definition: changes to "
                             f"{', '.join(self.changed_fields)} take effect at its next start (state=restarted "
                             "applies them)")  # fmt: skip
        result = {
            "changed": self.changed,
            "state": after_state,
            "changed_fields": self.changed_fields,
            "restart_needed": self.restart_needed and after_state != "stopped",
            **outcome,
        }
        if after_definition is not None:
            result["definition"] = after_definition
        if self.module._diff:
            result["diff"] = {
                "before": {} if before_definition is None else {**before_definition, "state": before_state},
                "after": {} if after_definition is None else {**after_definition, "state": after_state},
            }
        return result

    def define(
        self, info: dict[str, Any] | None, have: dict[str, Any] | None
    ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """Create or update the definition; the definition after, and guest.info (None while only predicted)."""
        want = definition.wanted(self.params)
        if info is None or have is None:
            if want.get("memory_mib") is None:
                raise ModuleFailure("invalid_params", f"guest {self.name!r} does not exist: memory_mib is needed to "
                                    "create it", field="memory_mib")  # fmt: skip
            self.changed = True
            params = definition.create_params(self.name, want)
            self.changed_fields = sorted(set(params) - {"name"})
            if self.check:
                return {key: value for key, value in params.items() if key != "name"}, None
            self.session.call("guest.create", params)
            created = self.session.guest_info(self.name)
            if created is None:
                raise ModuleFailure("guest_not_found", f"guest {self.name!r} was created but the node does not list it")
            return definition.stored(created["definition"]), created
        try:
            update = definition.changes(self.name, definition.with_stored_macs(want, have), have)
        except definition.DisksDiffer as error:
            raise ModuleFailure("unsupported", str(error), field="disks") from error
        if not update:
            return have, info
        running = info["state"] != "stopped"
        if self.check:
            self.changed = True
            self.changed_fields = sorted(update)
            self.restart_needed = running and bool(set(update) - CPU_FIELDS)
            return definition.predicted(have, update), info
        answer = self.session.call("guest.update", {"name": self.name, **update})
        # The agent's own comparison decides: what it keeps may equal the old definition after all.
        self.changed_fields = list(answer["changed"])
        self.changed = self.changed or bool(self.changed_fields)
        self.restart_needed = bool(answer["restart_needed"])
        return definition.stored(answer["definition"]), info

    def set_power(self, power: str) -> str:
        """Bring the guest to the power state asked for from POWER; the state after (predicted in check mode)."""
        state = self.params["state"]
        if state == "present":
            return power
        if state == "running":
            if power == "running":
                return power
            if power not in ("paused", "stopped"):
                raise ModuleFailure("guest_state", f"guest {self.name!r} is {power}: stop it first (state=stopped, "
                                    "force=true), then start it", state=power)  # fmt: skip
            self.changed = True
            if not self.check:
                self.session.call("guest.resume" if power == "paused" else "guest.start", {"name": self.name})
                self.wait_for("running")
            return "running"
        if state == "stopped":
            if power == "stopped":
                return power
            self.changed = True
            if not self.check:
                self.stop()
                self.wait_for("stopped")
            return "stopped"
        # restarted: a full stop and start, so a new definition takes effect.
        self.changed = True
        if not self.check:
            if power != "stopped":
                self.stop()
            self.session.call("guest.start", {"name": self.name})
            self.wait_for("running")
        self.restart_needed = False
        return "running"

    def stop(self) -> None:
        if self.params["force"]:
            self.session.call("guest.kill", {"name": self.name})
        else:
            timeout = int(self.timeout)
            self.session.call_waiting("guest.stop", {"name": self.name, "timeout": timeout}, timeout)

    def wait_for(self, state: str) -> None:
        if self.params["wait"]:
            self.session.wait_for_state(self.name, state, self.timeout)

    def remove(self, info: dict[str, Any]) -> dict[str, Any]:
        self.changed = True
        if self.check:
            return {}
        if info.get("pid") is not None and not self.params["force"]:
            self.stop()
        answer = self.session.call(
            "guest.delete",
            {"name": self.name, "force": self.params["force"], "remove_disks": self.params["remove_disks"]},
        )
        return {"disks_kept_in": answer.get("disks_kept_in")}


def main() -> None:
    module = AnsibleModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=True)
    run_module(module, lambda session: GuestTask(module, session).run())


if __name__ == "__main__":
    main()

#!/usr/bin/python
"""The node_info module: what an appliance node says about itself."""

from __future__ import annotations

DOCUMENTATION = r"""
module: node_info
short_description: An appliance node's host report, guests and images
version_added: 0.1.0
description:
  - Asks the node's agent for its host report (C(host.report)), its guests (C(guest.list)) and its image
    store (C(image.list)). Changes nothing.
extends_documentation_fragment:
  - appliance.hypervisor.node
  - appliance.hypervisor.node.attributes
  - ansible.builtin.action_common_attributes
  - ansible.builtin.action_common_attributes.flow
attributes:
  check_mode:
    support: full
  diff_mode:
    support: none
options: {}
seealso:
  - module: appliance.hypervisor.guest_info
author:
  - The appliance project (!UNKNOWN)
"""

EXAMPLES = r"""
- name: What every node has
  appliance.hypervisor.node_info:
  register: node

- name: Nodes whose guests could not use KVM
  ansible.builtin.debug:
    msg: "{{ inventory_hostname }}: {{ node.report.kvm.detail }}"
  when: not node.report.kvm.usable
"""

RETURN = r"""
report:
  description:
    - The agent's host report (C(host.report)), with host facts, the accelerator and why, memory reserved and allocated,
      the guest store's space, guests by state, load, the node's policy and bridges.
  returned: success
  type: dict
  sample: {accelerator: kvm, guests_by_state: {running: 2}, storage_free_bytes: 51539607552}
guests:
  description: Every guest with its state (C(guest.list)).
  returned: success
  type: list
  elements: dict
  sample: [{name: web, state: running, pid: 4242, vcpus: 2, memory_mib: 2048}]
images:
  description: The image store (C(image.list)).
  returned: success
  type: list
  elements: dict
  sample: [{name: debian-13, size_bytes: 1048576, sha256: 9f86d0..., created: 1767225600}]
code:
  description: The failure's stable code (the agent's, or the client's such as C(connection_failed)).
  returned: failed
  type: str
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.appliance.hypervisor.plugins.module_utils.node import node_argument_spec, run_module


def main() -> None:
    module = AnsibleModule(argument_spec=node_argument_spec(), supports_check_mode=True)
    run_module(
        module,
        lambda session: {
            "changed": False,
            "report": session.call("host.report", idempotent=True),
            "guests": session.call("guest.list", idempotent=True),
            "images": session.call("image.list", idempotent=True),
        },
    )


if __name__ == "__main__":
    main()

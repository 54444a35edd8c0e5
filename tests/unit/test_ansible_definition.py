"""The guest module's comparison (the collection's module_utils/definition.py) against the agent's own model.

definition.py is loaded from its file: it is standard library only, so no
Ansible is needed. Options are given as Ansible hands them to a module, every
suboption present and None when the task leaves it out.
"""

from __future__ import annotations

import importlib.util
from types import ModuleType
from typing import Any

import pytest

from appliance.agent.model import GuestSpec, parse_guest_spec, updated_spec
from appliance.build.layout import REPOSITORY

DEFINITION = REPOSITORY / "ansible/ansible_collections/appliance/hypervisor/plugins/module_utils/definition.py"
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIC8CHOk7Bq3LOGoXTiIUdr7RGNg3DxbfcEPB8Rg9MSRz operator@desk"


def load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("appliance_ansible_definition", DEFINITION)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


definition = load()


def options(**given: Any) -> dict[str, Any]:
    """The guest module's params for the definition fields, as AnsibleModule fills them."""
    params: dict[str, Any] = dict.fromkeys(definition.FIELDS)
    params.update(given)
    if params["nics"] is not None:
        params["nics"] = [{"bridge": None, "user": None, "vlan": None, "mac": None, "model": "virtio", **nic}
                          for nic in params["nics"]]  # fmt: skip
    if params["disks"] is not None:
        params["disks"] = [{"size_gib": None, "base_image": None, **disk} for disk in params["disks"]]
    return params


STORED_USER_DATA = "#cloud-config\npackages: [nginx]\n"
# As the node keeps it after create: every NIC with a MAC (derived ones in the node's 52:... range).
STORED = parse_guest_spec(
    {
        "name": "web",
        "vcpus": 2,
        "memory_mib": 256,
        "disks": [{"base_image": "debian"}, {"size_gib": 4}],
        "nics": [{"bridge": "br0", "vlan": 10, "mac": "52:11:22:33:44:55"}, {"user": True, "mac": "52:aa:bb:cc:dd:ee"}],
        "cloud_init": {"ssh_authorized_keys": [KEY], "user_data": STORED_USER_DATA},
        "restart": "on-failure",
    }
)
CLOUD_INIT = dict.fromkeys(("hostname", "ssh_authorized_keys", "user", "user_data", "network_config", "vendor_data"))
TASK = options(
    vcpus=2,
    memory_mib=256,
    disks=[{"base_image": "debian"}, {"size_gib": 4}],
    nics=[{"bridge": "br0", "vlan": 10}, {"user": True}],
    # The agent keeps a key's fields separated by one space.
    cloud_init=CLOUD_INIT | {"ssh_authorized_keys": [KEY.replace(" ", "   ", 1)], "user_data": STORED_USER_DATA},
    restart="on-failure",
)


def compare(task: dict[str, Any], spec: GuestSpec = STORED) -> dict[str, Any]:
    have = definition.stored(spec.to_json())
    changes: dict[str, Any] = definition.changes(
        spec.name, definition.with_stored_macs(definition.wanted(task), have), have
    )
    return changes


def test_stored_is_the_agents_own_create_params() -> None:
    expected = {key: value for key, value in STORED.to_params().items() if key != "name"}
    assert definition.stored(STORED.to_json()) == {"kernel_boot": None, **expected}


def test_a_task_without_the_derived_macs_is_no_change() -> None:
    assert compare(TASK) == {}


def test_a_changed_field_is_the_only_change_and_the_agent_takes_it() -> None:
    changes = compare({**TASK, "memory_mib": 512, "autostart": False})
    assert changes == {"memory_mib": 512}
    assert updated_spec(STORED, changes).memory_mib == 512


def test_changed_nics_keep_the_macs_at_their_places() -> None:
    changes = compare({**TASK, "nics": options(nics=[{"bridge": "br0", "vlan": 20}, {"user": True}])["nics"]})
    assert [nic.get("mac") for nic in changes["nics"]] == ["52:11:22:33:44:55", "52:aa:bb:cc:dd:ee"]
    updated = updated_spec(STORED, changes)
    assert [(nic.vlan, nic.mac) for nic in updated.nics] == [(20, "52:11:22:33:44:55"), (0, "52:aa:bb:cc:dd:ee")]


def test_a_mac_the_task_gives_one_nic_is_not_copied_to_another() -> None:
    nics = options(nics=[{"user": True, "mac": "52:aa:bb:cc:dd:ee"}, {"user": True}])["nics"]
    assert compare({**TASK, "nics": nics})["nics"] == [
        {"user": True, "mac": "52:aa:bb:cc:dd:ee", "model": "virtio"},
        {"user": True, "model": "virtio"},  # the node derives it a new one
    ]


def test_a_network_config_object_is_compared_as_the_agent_keeps_it() -> None:
    network = {"version": 2, "ethernets": {"eth0": {"dhcp4": True}}}
    spec = parse_guest_spec({"name": "db", "memory_mib": 32, "disks": [{"size_gib": 1}],
                             "cloud_init": {"network_config": network}})  # fmt: skip
    task = options(memory_mib=32, cloud_init={**CLOUD_INIT, "network_config": dict(reversed(network.items()))})
    assert compare(task, spec) == {}


def test_an_empty_section_removes_it_and_the_agent_takes_null() -> None:
    changes = compare({**TASK, "cloud_init": {"hostname": None, "user_data": ""}})
    assert changes == {"cloud_init": None}
    assert updated_spec(STORED, changes).cloud_init is None
    assert compare({**TASK, "kernel_boot": {"kernel_image": None, "initrd_image": None, "cmdline": None}}) == {}


def test_different_disks_are_refused_naming_both() -> None:
    with pytest.raises(definition.DisksDiffer, match=r'the node has \[\{"base_image": "debian"\}, \{"size_gib": 4\}\]'):
        compare({**TASK, "disks": options(disks=[{"base_image": "debian"}])["disks"]})


def test_create_params_are_what_the_agent_parses() -> None:
    params = definition.create_params("db", definition.wanted(options(memory_mib=64, disks=[{"size_gib": 1}])))
    assert params == {"name": "db", "memory_mib": 64, "disks": [{"size_gib": 1}]}
    assert parse_guest_spec(params).memory_mib == 64

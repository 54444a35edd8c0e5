"""The cloud_init section: what is refused (and why), and the seed's meta-data and user-data."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from appliance.agent.errors import AgentError
from appliance.agent.model import CloudInit, parse_cloud_init
from appliance.agent.seed import MAX_TEXT_BYTES, instance_id, meta_data, top_level_keys, user_data


def refused(section: object) -> AgentError:
    with pytest.raises(AgentError) as caught:
        parse_cloud_init(section)
    assert caught.value.code == "invalid_params"
    return caught.value


def test_a_full_section_is_kept(public_key: str) -> None:
    section: dict[str, Any] = {
        "hostname": "web-1.example.org",
        "ssh_authorized_keys": [public_key],
        "user": "operator",
        "user_data": "#cloud-config\npackages:\n- nginx\n",
        "network_config": {"version": 2, "ethernets": {"eth0": {"dhcp4": True}}},
        "vendor_data": "#!/bin/sh\necho vendor\n",
    }
    cloud_init = parse_cloud_init(section)
    assert cloud_init.ssh_authorized_keys == (public_key,)
    assert cloud_init.network_config == '{"ethernets": {"eth0": {"dhcp4": true}}, "version": 2}'


@pytest.mark.parametrize(
    ("section", "field", "message"),
    [
        ({}, "cloud_init", "at least one of"),
        ([], "cloud_init", "must be an object"),
        ({"hostname": "-bad-"}, "cloud_init.hostname", "host name"),
        ({"hostname": "a" * 64}, "cloud_init.hostname", "host name"),
        ({"hostname": ""}, "cloud_init.hostname", "empty"),
        ({"user": "Root Admin"}, "cloud_init.user", "user name"),
        ({"ssh_authorized_keys": "ssh-ed25519 AAAA"}, "cloud_init.ssh_authorized_keys", "list"),
        ({"ssh_authorized_keys": []}, "cloud_init.ssh_authorized_keys", "list"),
        ({"ssh_authorized_keys": ["hello world"]}, "cloud_init.ssh_authorized_keys[0]", "OpenSSH public key"),
        ({"ssh_authorized_keys": ["ssh-ed25519 !!!notbase64"]}, "cloud_init.ssh_authorized_keys[0]", "base64"),
        # Valid base64 of a blob that names another key type.
        (
            {"ssh_authorized_keys": ["ssh-rsa AAAAC3NzaC1lZDI1NTE5AAAAIA=="]},
            "cloud_init.ssh_authorized_keys[0]",
            "not a",
        ),
        ({"user_data": "packages: [vim]\n"}, "cloud_init.user_data", "#cloud-config"),
        ({"user_data": "#!/bin/sh\necho hi\n"}, "cloud_init.user_data", "#cloud-config"),
        ({"user_data": "#cloud-config\n- a\n- b\n"}, "cloud_init.user_data", "not a list"),
        ({"user_data": "#cloud-config\npackages:\n\t- vim\n"}, "cloud_init.user_data", "tab"),
        ({"user_data": "#cloud-config\njust words\n"}, "cloud_init.user_data", "not 'key: value'"),
        ({"user_data": "#cloud-config\na: 1\n---\nb: 2\n"}, "cloud_init.user_data", "another YAML document"),
        ({"user_data": "#cloud-config\n" + "# " * MAX_TEXT_BYTES}, "cloud_init.user_data", "64 KiB"),
        ({"user_data": 5}, "cloud_init.user_data", "text"),
        ({"vendor_data": "plain words"}, "cloud_init.vendor_data", "#cloud-config"),
        ({"network_config": {"version": 1, "config": []}}, "cloud_init.network_config", "version 2"),
        ({"network_config": "ethernets: {}\n"}, "cloud_init.network_config", "version 2"),
        ({"colour": "red"}, "cloud_init.colour", "unknown"),
    ],
)
def test_bad_sections_are_refused_naming_the_field(section: object, field: str, message: str) -> None:
    error = refused(section)
    assert error.details["field"] == field
    assert message in error.message


def test_user_data_keys_are_read_from_a_block_mapping() -> None:
    text = (
        "#cloud-config\n---\n# a comment\npackages:\n- vim\n"
        'write_files:\n  - path: /x\n    content: |\n      a: b\n"quoted": 1\n'
    )
    assert top_level_keys(text, "f") == ["packages", "write_files", "quoted"]


def test_user_data_gets_the_sections_host_name_keys_and_user(public_key: str) -> None:
    cloud_init = CloudInit(
        hostname="web-1",
        ssh_authorized_keys=(public_key,),
        user="operator",
        user_data="#cloud-config\nwrite_files:\n- path: /etc/motd\n  content: |\n    hello",
    )
    text = user_data(cloud_init)
    assert text.startswith("#cloud-config\nwrite_files:\n")
    # The block scalar above ends at the added keys, which are JSON (and so YAML) values.
    assert text.endswith(f'hostname: "web-1"\nssh_authorized_keys: ["{public_key}"]\nuser: "operator"\n')
    assert top_level_keys(text, "f") == ["write_files", "hostname", "ssh_authorized_keys", "user"]
    # Without user-data, the keys make the whole document.
    assert (
        user_data(CloudInit(hostname="h"))
        == '#cloud-config\n\n# From the guest\'s cloud_init section (appliance agent):\nhostname: "h"\n'
    )


def test_a_key_set_in_both_places_is_refused_rather_than_guessed() -> None:
    with pytest.raises(AgentError) as caught:
        parse_and_render({"hostname": "a", "user_data": "#cloud-config\nfqdn: b.example.org\n"})
    assert caught.value.details["field"] == "cloud_init.hostname"


def parse_and_render(section: dict[str, Any]) -> str:
    return user_data(parse_cloud_init(section))


def test_instance_id_follows_the_section_and_the_guest() -> None:
    one = CloudInit(hostname="a")
    assert instance_id("g1", one) == instance_id("g1", CloudInit(hostname="a"))
    assert instance_id("g1", one) != instance_id("g1", replace(one, hostname="b"))
    assert instance_id("g1", one) != instance_id("g2", one)
    assert meta_data("g1", one) == f"instance-id: {instance_id('g1', one)}\nlocal-hostname: a\n"
    # Without a host name, the guest's name is the host's when it is a valid one.
    assert meta_data("db-2", CloudInit(user="x")).endswith("local-hostname: db-2\n")
    assert "local-hostname" not in meta_data("under_score", CloudInit(user="x"))

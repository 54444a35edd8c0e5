"""The throwaway TLS credentials of a direct migration: one authority signs both ends, the server's
certificate names the address the source connects to, and each end is usable for its side only."""

from __future__ import annotations

import ipaddress

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from appliance.nodes.credentials import make_credentials


def test_both_ends_are_signed_by_one_new_authority_and_the_server_names_the_address() -> None:
    made = make_credentials("192.0.2.7")
    authority = x509.load_pem_x509_certificate(made.ca.encode())
    server = x509.load_pem_x509_certificate(made.server_cert.encode())
    client = x509.load_pem_x509_certificate(made.client_cert.encode())
    for certificate in (server, client):
        certificate.verify_directly_issued_by(authority)
    assert authority.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("192.0.2.7")]
    assert server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value == x509.ExtendedKeyUsage(
        [ExtendedKeyUsageOID.SERVER_AUTH]
    )
    assert client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value == x509.ExtendedKeyUsage(
        [ExtendedKeyUsageOID.CLIENT_AUTH]
    )
    assert made.server_key.startswith("-----BEGIN PRIVATE KEY-----")
    assert set(made.server()) == set(made.client()) == {"ca", "cert", "key"}


def test_a_host_name_is_named_as_one_and_every_migration_gets_its_own_authority() -> None:
    first, second = make_credentials("node2.example.net"), make_credentials("node2.example.net")
    server = x509.load_pem_x509_certificate(first.server_cert.encode())
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["node2.example.net"]
    assert first.ca != second.ca and first.client_key != second.client_key

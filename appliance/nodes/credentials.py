"""TLS credentials for one direct migration (`guest migrate --direct`), made here and thrown away after.

A throwaway certificate authority signs a server certificate for the
destination (named for the address the source reaches it at, which QEMU checks)
and a client certificate for the source (the destination's QEMU accepts only a
peer the same authority signed). Nothing is kept: the private keys live in this
process and, for as long as QEMU takes to load them, in the guest's directory
on each node; the authority's key is never written anywhere.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# Long enough for the longest migration, short enough to be worth nothing after.
VALID = datetime.timedelta(days=2)
CLOCK_SKEW = datetime.timedelta(hours=1)


@dataclass(frozen=True)
class Credentials:
    """PEM text: what each node's QEMU loads as its tls-creds-x509 (migration.py's `direct`)."""

    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str

    def server(self) -> dict[str, str]:
        return {"ca": self.ca, "cert": self.server_cert, "key": self.server_key}

    def client(self) -> dict[str, str]:
        return {"ca": self.ca, "cert": self.client_cert, "key": self.client_key}


def make_credentials(destination: str) -> Credentials:
    """A new authority, a server certificate for `destination` (an IP address or a DNS name) and a client
    certificate, all for this migration alone."""
    now = datetime.datetime.now(datetime.UTC)
    authority_key = ec.generate_private_key(ec.SECP256R1())
    authority = name("appliance migration authority")
    ca = (
        builder(authority, authority, authority_key.public_key(), now)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(usage(key_cert_sign=True), critical=True)
        .sign(authority_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = (
        builder(name(destination), authority, server_key.public_key(), now)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(usage(digital_signature=True, key_encipherment=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([alternative_name(destination)]), critical=False)
        .sign(authority_key, hashes.SHA256())
    )
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = (
        builder(name("appliance migration source"), authority, client_key.public_key(), now)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(usage(digital_signature=True, key_encipherment=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(authority_key, hashes.SHA256())
    )
    return Credentials(pem(ca), pem(server), private(server_key), pem(client), private(client_key))


def name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64])])


def builder(
    subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePublicKey, now: datetime.datetime
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + VALID)
    )


def usage(
    digital_signature: bool = False, key_encipherment: bool = False, key_cert_sign: bool = False
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=key_cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def alternative_name(destination: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(destination))
    except ValueError:
        return x509.DNSName(destination)


def pem(certificate: x509.Certificate) -> str:
    return certificate.public_bytes(serialization.Encoding.PEM).decode()


def private(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()

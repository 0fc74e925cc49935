"""A throwaway PKI for TLS tests and benchmarks, made with the ``openssl`` command.

:class:`Authority` is a CA in a directory; :meth:`Authority.issue` signs a key
pair for a subject, valid now (or, with ``expired=True``, only in 2020), with
``127.0.0.1`` and ``localhost`` as subject alternative names so the same
certificate serves a server and a client. :func:`pkcs12` and
:func:`truststore` turn them into the keystores a Java ZooKeeper wants.

Deliberately free of pytest, so ``bench/`` can use it too.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import attrs

from dispatcher.tls import ClientTls

__all__ = ["Authority", "Issued", "pkcs12", "truststore"]

_CA_CONFIG = """\
[ ca ]
default_ca = local
[ local ]
dir = {dir}
database = $dir/index.txt
new_certs_dir = $dir/issued
serial = $dir/serial
default_md = sha256
policy = anything
unique_subject = no
copy_extensions = none
[ anything ]
commonName = supplied
countryName = optional
organizationName = optional
organizationalUnitName = optional
[ leaf ]
basicConstraints = CA:FALSE
subjectAltName = IP:127.0.0.1, DNS:localhost
extendedKeyUsage = serverAuth, clientAuth
keyUsage = digitalSignature, keyEncipherment
"""


def _run(*args: str | Path) -> None:
    subprocess.run([str(a) for a in args], check=True, capture_output=True)


@attrs.frozen
class Issued:
    """A PEM certificate and its PEM key."""

    cert: Path
    key: Path


class Authority:
    """A CA whose key and certificate live in ``directory``."""

    def __init__(self, directory: Path, name: str = "zkgate test CA") -> None:
        if shutil.which("openssl") is None:
            raise RuntimeError("the openssl command is needed to make test certificates")
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "issued").mkdir(exist_ok=True)
        (directory / "index.txt").write_text("")
        (directory / "serial").write_text("1000\n")
        self.config = directory / "ca.cnf"
        self.config.write_text(_CA_CONFIG.format(dir=directory))
        self.key = directory / "ca-key.pem"
        self.cert = directory / "ca.pem"
        _run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", "30",
             "-subj", f"/CN={name}", "-keyout", self.key, "-out", self.cert)  # fmt: skip

    def issue(self, name: str, subject: str, *, expired: bool = False) -> Issued:
        """A key pair for ``subject`` (``/O=Example/OU=apps/CN=alice``, most general first)."""
        key = self.directory / f"{name}-key.pem"
        csr = self.directory / f"{name}.csr"
        cert = self.directory / f"{name}.pem"
        _run("openssl", "req", "-new", "-newkey", "rsa:2048", "-nodes", "-subj", subject,
             "-keyout", key, "-out", csr)  # fmt: skip
        dates = (
            ["-startdate", "20200101000000Z", "-enddate", "20200102000000Z"]
            if expired
            else ["-days", "30"]
        )
        _run("openssl", "ca", "-batch", "-notext", "-preserveDN", "-config", self.config,
             "-extensions", "leaf", "-cert", self.cert, "-keyfile", self.key,
             "-in", csr, "-out", cert, *dates)  # fmt: skip
        return Issued(cert, key)


def pkcs12(issued: Issued, authority: Authority, path: Path, password: str) -> Path:
    """A PKCS12 keystore holding ``issued``'s key and chain (``ssl.keyStore.location``)."""
    _run("openssl", "pkcs12", "-export", "-in", issued.cert, "-inkey", issued.key,
         "-certfile", authority.cert, "-name", "zkgate", "-out", path,
         "-passout", f"pass:{password}")  # fmt: skip
    return path


def truststore(authority: Authority, path: Path, password: str) -> Path:
    """A PKCS12 truststore trusting ``authority`` (``ssl.trustStore.location``)."""
    _run("keytool", "-importcert", "-noprompt", "-alias", "ca", "-file", authority.cert,
         "-keystore", path, "-storetype", "PKCS12", "-storepass", password)  # fmt: skip
    return path


@attrs.frozen
class Pki:
    """A CA with a server and a client certificate, and a stranger's CA with one of its own."""

    ca: Authority
    #: Someone else's CA, which signed ``stranger``.
    other: Authority
    server: Issued
    client: Issued
    stranger: Issued

    def client_tls(self, issued: Issued | None = None) -> ClientTls:
        issued = issued or self.client
        return ClientTls(self.ca.cert, issued.cert, issued.key)

    def tls_table(self, issued: Issued | None = None) -> dict[str, str]:
        return self.client_tls(issued).to_mapping()


def make_pki(base: Path, client: str = "client", subject: str = "/O=Example/CN=zkgate") -> Pki:
    """A :class:`Pki` under ``base``; the client certificate is ``client`` with ``subject``."""
    ca = Authority(base / "ca")
    other = Authority(base / "other", name="someone else's CA")
    return Pki(
        ca=ca,
        other=other,
        server=ca.issue("server", "/CN=localhost"),
        client=ca.issue(client, subject),
        stranger=other.issue("stranger", "/CN=stranger"),
    )

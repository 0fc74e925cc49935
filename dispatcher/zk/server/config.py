"""The ``[zookeeper]`` table: the ZooKeeper face on the embedded tree, and its mounts::

    [zookeeper]
    listen = "127.0.0.1:2181"
    data_dir = "/var/lib/zkgate"    # relative paths are relative to the config file
    tick_ms = 2000
    max_buffer = 1048576            # jute.maxbuffer
    max_client_cnxns = 60           # per client IP, 0 for no limit
    extended_types = false          # TTL nodes
    container_check_ms = 60000      # znode.container.checkIntervalMs
    super_digest = "super:BASE64SHA1"
    four_letter_words = "ruok, srvr, mntr, isro"  # 4lw.commands.whitelist; "*" for all
    secure_listen = "0.0.0.0:2281"  # ZooKeeper's secureClientPort; needs [zookeeper.tls]
                                    # (listen = "off" then leaves only the TLS port)
    sasl_jaas_file = "jaas.conf"    # DIGEST-MD5 users: the JAAS file's Server section
    sasl_required = false           # zookeeper.sessionRequireClientSASLAuth

    [zookeeper.tls]                 # see dispatcher.tls
    cert = "server.pem"
    key = "server-key.pem"
    ca = "clients-ca.pem"
    verify_client = true            # clients then carry an x509:<subject DN> identity;
                                    # "want": asked for, verified if given, not required
    x509_superuser = "CN=admin,O=Example"  # this certificate subject is a superuser

The same keys come from ``zkgate serve``'s flags (``--tick-ms``, ``--4lw``...):
:func:`parse_zookeeper` with ``where=None`` names them as flags in its messages.

:func:`mount_root` checks the ``root`` of a table that mounts a subtree into this
face's tree (a projection or a mirror).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import attrs

from dispatcher import settings
from dispatcher.settings import ConfigError
from dispatcher.tls import TlsConfig, parse_tls
from dispatcher.wire import parse_address
from dispatcher.zk.codec.paths import InvalidPath, is_within, validate_path
from dispatcher.zk.codec.protocol import DEFAULT_MAX_BUFFER
from dispatcher.zk.server.fourletter import DEFAULT_WHITELIST, FourLetterWhitelist
from dispatcher.zk.server.jaas import JaasError, SaslUsers, load_users

__all__ = ["ZooKeeperConfig", "default_data_dir", "mount_root", "parse_zookeeper"]

_ZOOKEEPER_KEYS: Final = (
    "listen",
    "data_dir",
    "tick_ms",
    "max_buffer",
    "max_client_cnxns",
    "extended_types",
    "container_check_ms",
    "super_digest",
    "four_letter_words",
    "secure_listen",
    "tls",
    "sasl_jaas_file",
    "sasl_required",
)
#: Command-line flags whose name is not ``--`` plus the key with dashes.
_FLAG_NAMES: Final = {"four_letter_words": "--4lw"}


def default_data_dir() -> Path:
    """``$XDG_DATA_HOME/zkgate``, as ``zkgate serve`` uses without ``--data-dir``."""
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "zkgate"


@attrs.frozen
class ZooKeeperConfig:
    """The ``[zookeeper]`` table: the ZooKeeper face on the embedded tree."""

    listen: str = attrs.field(default="127.0.0.1:2181", validator=settings.valid_listen)
    data_dir: Path = attrs.field(factory=default_data_dir)
    tick_ms: int = 2000
    max_buffer: int = DEFAULT_MAX_BUFFER
    max_client_cnxns: int = 60
    extended_types: bool = False
    container_check_ms: int = 60000
    super_digest: str | None = None
    four_letter_words: FourLetterWhitelist = DEFAULT_WHITELIST
    #: The TLS port (ZooKeeper's ``secureClientPort``), served with ``tls``; None: off.
    secure_listen: str | None = attrs.field(
        default=None, validator=attrs.validators.optional(settings.valid_listen)
    )
    tls: TlsConfig | None = None
    #: False (``listen = "off"``): no plain-text port, only ``secure_listen``.
    plain: bool = True
    #: The JAAS file whose ``Server`` section lists the DIGEST-MD5 users; None: no SASL.
    sasl_jaas_file: Path | None = None
    #: The users read from it at load time (passwords kept out of ``repr``).
    sasl_users: SaslUsers | None = attrs.field(default=None, repr=False)
    #: ZooKeeper's ``zookeeper.sessionRequireClientSASLAuth``.
    sasl_required: bool = False

    @property
    def host(self) -> str:
        return parse_address(self.listen)[0]

    @property
    def port(self) -> int:
        return parse_address(self.listen)[1]

    def to_mapping(self) -> dict[str, Any]:
        """The ``[zookeeper]`` table as TOML would give it."""
        result: dict[str, Any] = {
            "listen": self.listen if self.plain else "off",
            "data_dir": str(self.data_dir),
            "tick_ms": self.tick_ms,
            "max_buffer": self.max_buffer,
            "max_client_cnxns": self.max_client_cnxns,
            "extended_types": self.extended_types,
            "container_check_ms": self.container_check_ms,
            "four_letter_words": str(self.four_letter_words),
        }
        if self.super_digest is not None:
            result["super_digest"] = self.super_digest
        if self.secure_listen is not None:
            result["secure_listen"] = self.secure_listen
        if self.tls is not None:
            result["tls"] = self.tls.to_mapping()
        if self.sasl_jaas_file is not None:
            result["sasl_jaas_file"] = str(self.sasl_jaas_file)
            result["sasl_required"] = self.sasl_required
        return result


def parse_zookeeper(
    table: Mapping[str, Any], base_dir: Path | None, where: str | None = "zookeeper"
) -> ZooKeeperConfig:
    """Check the ``[zookeeper]`` table (``where=None``: command-line flags, named as such).

    A relative ``data_dir`` is taken relative to ``base_dir`` (the config file's
    directory) when there is one.
    """

    def name(key: str) -> str:
        if where:
            return f"{where}.{key}"
        return _FLAG_NAMES.get(key, "--" + key.replace("_", "-"))

    settings.reject_unknown(table, _ZOOKEEPER_KEYS, where or "")
    options: dict[str, Any] = {}
    if table.get("listen") == "off":
        options["plain"] = False
    elif "listen" in table:
        options["listen"] = settings.address(table["listen"], name("listen"))
    if "data_dir" in table:
        data_dir = settings.user_path(table["data_dir"], name("data_dir"))
        if not data_dir.is_absolute() and base_dir is not None:
            data_dir = base_dir / data_dir
        options["data_dir"] = data_dir
    for key in ("tick_ms", "max_buffer", "container_check_ms"):
        if key in table:
            options[key] = settings.integer(table[key], name(key), minimum=1)
    if "max_client_cnxns" in table:
        options["max_client_cnxns"] = settings.integer(
            table["max_client_cnxns"], name("max_client_cnxns"), minimum=0
        )
    if "extended_types" in table:
        options["extended_types"] = settings.boolean(
            table["extended_types"], name("extended_types")
        )
    if "super_digest" in table:
        digest = settings.string(table["super_digest"], name("super_digest"))
        if ":" not in digest:
            raise ConfigError(f"{name('super_digest')}: expected USER:BASE64SHA1")
        options["super_digest"] = digest
    if "four_letter_words" in table:
        options["four_letter_words"] = _four_letter_words(
            table["four_letter_words"], name("four_letter_words")
        )
    if "tls" in table:
        options["tls"] = parse_tls(table["tls"], f"{where or 'zookeeper'}.tls", base_dir, x509=True)
    if "secure_listen" in table:
        options["secure_listen"] = settings.address(table["secure_listen"], name("secure_listen"))
        if "tls" not in options:
            raise ConfigError(
                f"{name('secure_listen')}: needs a [zookeeper.tls] table (cert and key)"
            )
    elif not options.get("plain", True):
        raise ConfigError(f"{name('listen')}: can be off only beside a secure_listen")
    if "sasl_jaas_file" in table:
        jaas = settings.user_path(table["sasl_jaas_file"], name("sasl_jaas_file"))
        if not jaas.is_absolute() and base_dir is not None:
            jaas = base_dir / jaas
        try:
            options["sasl_users"] = load_users(jaas)
        except JaasError as exc:
            raise ConfigError(f"{name('sasl_jaas_file')}: {exc}") from None
        options["sasl_jaas_file"] = jaas
    if "sasl_required" in table:
        options["sasl_required"] = settings.boolean(table["sasl_required"], name("sasl_required"))
        if options["sasl_required"] and "sasl_jaas_file" not in options:
            raise ConfigError(
                f"{name('sasl_required')}: needs sasl_jaas_file (the users to authenticate)"
            )
    return ZooKeeperConfig(**options)


def _four_letter_words(value: Any, where: str) -> FourLetterWhitelist:
    """ZooKeeper's ``4lw.commands.whitelist`` string (``"ruok, srvr"``, ``"*"``), so a
    value copied from zoo.cfg means the same here; an empty string leaves only ``srvr``."""
    if not isinstance(value, str):
        raise ConfigError(
            f"{where}: must be a comma-separated string such as "
            f'"ruok, srvr", not {settings.type_name(value)}'
        )
    try:
        return FourLetterWhitelist.parse(value)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def mount_root(
    table: Mapping[str, Any], where: str, required: tuple[str, ...], taken: list[str]
) -> str:
    """The ``root`` of a mount table (projection or mirror), its required keys present.

    A mount may not cover the whole tree, ZooKeeper's own ``/zookeeper``, or any
    of the mounts in ``taken``.
    """
    kind = where.partition("[")[0]
    for key in required:
        if key not in table:
            raise ConfigError(f"{where}.{key}: missing (every {kind} needs one)")
    root = settings.string(table["root"], f"{where}.root")
    try:
        validate_path(root)
    except InvalidPath as exc:
        raise ConfigError(f"{where}.root: {exc}") from None
    if root == "/" or is_within(root, "/zookeeper"):
        raise ConfigError(f"{where}.root: cannot be / or under /zookeeper")
    for other in taken:
        if is_within(root, other) or is_within(other, root):
            raise ConfigError(f"{where}.root: {root} overlaps the mount at {other}")
    return root

"""Apache Dubbo's ZooKeeper registry layout.

A provider registers under ``/dubbo/<interface>/providers`` an ephemeral
znode whose *name* is its whole URL, encoded with Java's
``URLEncoder.encode(url, "UTF-8")``::

    dubbo%3A%2F%2F10.0.0.1%3A20880%2Fcom.foo.Bar%3Fanyhost%3Dtrue%26weight%3D50

which decodes to ``dubbo://10.0.0.1:20880/com.foo.Bar?anyhost=true&weight=50``.
Consumers list the children and never read the data (Dubbo creates the
znode through Curator without data, so it holds Curator's default: the
provider's IP address).

Mapping to the model: the URL scheme is the protocol, host and port are the
URL's, ``weight`` (Dubbo's default is 100, like ours) and ``zone`` come from
the query, ``disabled=true`` or ``enabled=false`` (what Dubbo's consumers
skip) make the instance failing, and every other query parameter is
metadata. The instance id is the provider address ``host:port``: Dubbo has
no other instance identity, and a provider re-registering with new
parameters is an update of the same instance, not a new one.

Rendering writes the URL as Dubbo's ``URL.toFullString`` does: parameters
sorted by key in Java's ``String`` order, each value trimmed as Java's
``String.trim`` trims, the whole URL then encoded with ``URLEncoder``; and,
like every Dubbo provider's URL, it names its ``interface`` (some consumers
key providers by it), so a parsed rendering has ``interface`` in its
metadata. Not represented: ``passing`` health (rendered like ``unknown``),
an empty protocol (rendered as ``dubbo``), instance ids other than
``host:port``, blanks (characters up to U+0020) at either end of a value
(trimmed, as Dubbo trims them), empty and blank values (Dubbo 3 reads
``key=`` back as ``key=key``), and metadata entries Dubbo's own
URL parser would mis-split or that text cannot carry: a key containing
``&``, ``;`` or ``=`` or with blanks at an end (Dubbo 2.7 trims each
``key=value``), a value containing ``&`` or ``;`` (Dubbo splits parameters on
both without unescaping), text with a lone surrogate (no UTF-8 for it).
Those are omitted rather than corrupt the other parameters.

Besides ``providers``, a Dubbo consumer expects a service's ``consumers``,
``configurators`` and ``routers`` directories (:data:`CATEGORIES`): it
creates them when absent, watches all but ``consumers``, and registers
itself under ``consumers`` (:data:`CLIENT_PATHS` are the paths it writes).
A projection writes a service's governance policy into ``configurators`` and
``routers`` (:func:`governance`, :mod:`adapters.layouts.dubbo_governance`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Final
from urllib.parse import unquote_plus

from adapters.layouts import as_int
from dispatcher.core.model import Health, Instance, Source
from dispatcher.governance.policy import Policy
from dispatcher.wire import join_address, parse_address

__all__ = [
    "CATEGORIES",
    "CLIENT_PATHS",
    "CONSUMERS",
    "NAME",
    "categories",
    "decode",
    "directory",
    "encode",
    "governance",
    "java_order",
    "parse",
    "render",
    "service_of",
]

NAME: Final = "dubbo"

_PROVIDERS: Final = "providers"
CONSUMERS: Final = "consumers"
#: A service's category directories, as ``ZookeeperRegistry.toCategoriesPath``
#: names them: consumers subscribe to the first, third and fourth.
CATEGORIES: Final = (_PROVIDERS, CONSUMERS, "routers", "configurators")
#: What a Dubbo consumer writes below the registry's root, relative to it
#: (``*`` is any one name): the service's znode and its category directories
#: when absent (``AbstractZookeeperClient.create`` checks, then creates
#: persistent parents), and its own ``consumer://`` znode.
CLIENT_PATHS: Final = ("*", *(f"*/{category}" for category in CATEGORIES), f"*/{CONSUMERS}/*")
_DEFAULT_PROTOCOL: Final = "dubbo"
_DEFAULT_WEIGHT: Final = 100
_SCHEME: Final = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*")
# Characters java.net.URLEncoder leaves alone; everything else is %XX of
# its UTF-8 bytes, except space which becomes "+".
_UNRESERVED: Final = frozenset(
    b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-*_"
)
# Query keys the model owns; they are not metadata.
_MODEL_KEYS: Final = frozenset({"weight", "zone", "enabled", "disabled"})
# What Java's String.trim removes from both ends: every char up to U+0020.
_JAVA_BLANKS: Final = "".join(map(chr, range(0x21)))


def encode(text: str) -> str:
    """``text`` encoded exactly as Java's ``URLEncoder.encode(text, "UTF-8")`` does.

    Python's ``quote_plus`` differs (it keeps ``~`` and escapes ``*``), and
    the znode name must be byte-identical to what a Dubbo provider would
    have written, or consumers see two providers for one.
    """
    out: list[str] = []
    for byte in text.encode("utf-8"):
        if byte in _UNRESERVED:
            out.append(chr(byte))
        elif byte == 0x20:
            out.append("+")
        else:
            out.append(f"%{byte:02X}")
    return "".join(out)


def decode(text: str) -> str | None:
    """Inverse of :func:`encode` (``+`` is a space), or None for invalid UTF-8."""
    try:
        return unquote_plus(text, errors="strict")
    except UnicodeDecodeError:
        return None


def directory(service: str) -> str:
    """``<interface>/providers``, the interface encoded as Dubbo encodes it."""
    return f"{encode(service)}/{_PROVIDERS}"


def categories(service: str) -> tuple[str, ...]:
    """The service's category directories other than :func:`directory`, relative to the root."""
    return tuple(f"{encode(service)}/{category}" for category in CATEGORIES[1:])


def service_of(directory: str) -> str | None:
    """The interface of a ``<interface>/providers`` directory, or None."""
    interface, slash, leaf = directory.strip("/").partition("/")
    if not slash or leaf != _PROVIDERS or not interface:
        return None
    return decode(interface) or None


def _split_params(query: str) -> dict[str, str]:
    """Query parameters with the rules of Dubbo's ``URLStrParser``.

    Separators are ``&`` and ``;``, the first ``=`` splits key from value,
    and a bare key is its own value (``anyhost`` means ``anyhost=anyhost``).
    """
    params: dict[str, str] = {}
    for part in re.split(r"[&;]", query):
        key, equals, value = part.partition("=")
        if key:
            params[key] = value if equals else key
    return params


def _split_address(authority: str) -> tuple[str, int] | None:
    try:
        # Drop user:password@ first: the password may hold a colon.
        return parse_address(authority.rpartition("@")[2], default_host=None)
    except ValueError:
        return None


def _is_true(value: str | None) -> bool:
    return value is not None and value.strip().lower() == "true"


def parse(
    service: str, name: str, data: bytes = b"", *, source: Source | None = None
) -> Instance | None:
    """One provider znode as an Instance; None if ``name`` is not a provider URL.

    ``service`` is the interface of the directory the znode was found in;
    when it is empty the URL's ``interface`` parameter, then its path, is
    used. ``data`` is ignored: Dubbo consumers never read it.
    """
    del data
    url = decode(name)
    if url is None:
        return None
    scheme, sep, rest = url.partition("://")
    if not sep or not _SCHEME.fullmatch(scheme):
        return None
    body, _, query = rest.partition("?")
    authority, _, path = body.partition("/")
    address = _split_address(authority)
    if address is None:
        return None
    host, port = address
    params = _split_params(query)

    interface = service or params.get("interface") or path
    if not interface:
        return None

    weight = as_int(params.get("weight", params.get("default.weight")))
    if "disabled" in params:
        failing = _is_true(params["disabled"])
    else:
        failing = params.get("enabled", "true").strip().lower() == "false"

    try:
        return Instance(
            interface,
            join_address(host, port),
            host,
            port,
            weight=_DEFAULT_WEIGHT if weight is None or weight < 0 else weight,
            zone=params.get("zone", ""),
            protocol=scheme,
            metadata={k: v for k, v in params.items() if k not in _MODEL_KEYS},
            health=Health.FAILING if failing else Health.UNKNOWN,
            source=source,
        )
    except (TypeError, ValueError):
        return None


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _parameter(key: str, value: str) -> str | None:
    """``value`` as Dubbo writes it for ``key`` (trimmed), or None when it cannot be written."""
    value = value.strip(_JAVA_BLANKS)
    if (
        not key
        or key != key.strip(_JAVA_BLANKS)
        or any(c in key for c in "&;=")
        or not value
        or any(c in value for c in "&;")
        or not (_utf8(key) and _utf8(value))
    ):
        return None
    return value


def java_order(key: str) -> bytes:
    """The sort key of ``key`` in Java's ``String`` order (how Dubbo sorts parameters)."""
    # TreeMap<String, ...> compares UTF-16 code units; big-endian UTF-16
    # bytes compare the same way (code points do not, past U+FFFF).
    return key.encode("utf-16-be", "surrogatepass")


def render(instance: Instance) -> tuple[str, bytes]:
    """``instance`` as a provider znode: ``(encoded URL, host bytes)``.

    The query is built as Dubbo's ``URL.toFullString`` builds it (see the
    module's docstring), so that equal instances always render to the same
    znode name and a Dubbo provider's own URL renders byte for byte.
    """
    params: dict[str, str] = {}
    for key, raw in instance.metadata.items():
        value = _parameter(key, raw)
        if value is not None and key not in _MODEL_KEYS:
            params[key] = value
    # Dubbo reads "default.weight" when "weight" is absent (a pre-2.7
    # spelling), so an explicit weight must be written whenever it is there.
    if instance.weight != _DEFAULT_WEIGHT or "default.weight" in params:
        params["weight"] = str(instance.weight)
    zone = _parameter("zone", instance.zone)
    if zone is not None:
        params["zone"] = zone
    if instance.health is Health.FAILING:
        params["disabled"] = "true"
    interface = _parameter("interface", instance.service)
    if interface is not None:
        params.setdefault("interface", interface)
    query = "&".join(f"{key}={params[key]}" for key in sorted(params, key=java_order))
    url = (
        f"{instance.protocol or _DEFAULT_PROTOCOL}://"
        f"{join_address(instance.host, instance.port)}/{instance.service}"
    )
    if query:
        url = f"{url}?{query}"
    return encode(url), instance.host.encode("utf-8")


def governance(
    service: str, instances: Iterable[Instance], policy: Policy
) -> dict[str, dict[str, bytes]]:
    """``{category directory relative to the root: {znode name: data}}``: ``policy`` as the
    override and route URLs Dubbo consumers read, given the providers shown."""
    # Imported here: that module builds on this one's URL encoding.
    from adapters.layouts import dubbo_governance

    rendered = dubbo_governance.render(service, instances, policy)
    return {f"{encode(service)}/{category}": children for category, children in rendered.items()}

"""The ``[governance]`` table: how this Dispatcher keeps and accepts policy changes::

    [governance]                    # optional; policies need a [membership] store
    max_history = 100               # versions kept in the store, the current one included
    token_file = "/etc/zkgate/policy-token"   # the bearer token every write must present
    # token = "a long random secret"          # or inline (either one, not both)

The policies themselves live in the ``[membership]`` store (see
:mod:`dispatcher.governance.store`); without ``[membership]`` this table is accepted but
policies are unavailable. Without a token, the admin endpoint's policy API is read-only.
A ``token_file`` is read when the configuration is loaded (surrounding whitespace stripped),
so a missing or empty file stops the start with a message naming the key.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import attrs

from dispatcher import settings
from dispatcher.governance.store import DEFAULT_MAX_HISTORY
from dispatcher.settings import ConfigError

__all__ = ["MAX_HISTORY_LIMIT", "GovernanceConfig", "parse_governance"]

_GOVERNANCE_KEYS: Final = ("max_history", "token", "token_file")

MAX_HISTORY_LIMIT: Final = 100_000
"""The most versions a store may be asked to keep: each is one znode or key."""


@attrs.frozen
class GovernanceConfig:
    """The ``[governance]`` table (see the module docstring).

    ``token`` is the write token, resolved from ``token_file`` when that was given; it is left
    out of ``repr`` so that it never reaches a log line. None: policy writes are refused.
    """

    max_history: int = DEFAULT_MAX_HISTORY
    token: str | None = attrs.field(default=None, repr=False)
    token_file: Path | None = None

    def to_mapping(self) -> dict[str, Any]:
        """The ``[governance]`` table as TOML would give it (the token as it was given)."""
        result: dict[str, Any] = {"max_history": self.max_history}
        if self.token_file is not None:
            result["token_file"] = str(self.token_file)
        elif self.token is not None:
            result["token"] = self.token
        return result


def parse_governance(table: Mapping[str, Any], base_dir: Path | None) -> GovernanceConfig:
    """Check the ``[governance]`` table; a relative ``token_file`` is relative to
    ``base_dir`` (the configuration file's directory)."""
    where = "governance"
    settings.reject_unknown(table, _GOVERNANCE_KEYS, where)
    options: dict[str, Any] = {}
    if "max_history" in table:
        history = settings.integer(table["max_history"], f"{where}.max_history", minimum=1)
        if history > MAX_HISTORY_LIMIT:
            raise ConfigError(
                f"{where}.max_history: must be at most {MAX_HISTORY_LIMIT}, not {history}"
            )
        options["max_history"] = history
    if "token" in table and "token_file" in table:
        raise ConfigError(f"{where}.token_file: give token or token_file, not both")
    if "token" in table:
        options["token"] = settings.string(table["token"], f"{where}.token")
    if "token_file" in table:
        path = settings.user_path(table["token_file"], f"{where}.token_file")
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        try:
            token = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise ConfigError(f"{where}.token_file: cannot read {str(path)!r}: {reason}") from None
        if not token:
            raise ConfigError(f"{where}.token_file: {str(path)!r} is empty")
        options["token"] = token
        options["token_file"] = path
    return GovernanceConfig(**options)

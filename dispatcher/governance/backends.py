"""Opening the governance store that a ``[membership]`` table names.

Governance documents live in the same ZooKeeper ensemble or etcd cluster as membership, under
the same root (``<root>/governance/<kind>``), so a cluster of Dispatchers shares them without a
store of its own, and reach it as membership does (its ``tls`` table, its SASL user).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager

from dispatcher.governance.store import (
    DEFAULT_MAX_BODY,
    DEFAULT_MAX_HISTORY,
    DEFAULT_REQUEST_TIMEOUT,
    GovernanceStore,
    check_kind,
)
from dispatcher.governance.store_etcd import open_etcd_store
from dispatcher.governance.store_memory import MemoryGovernance, MemoryGovernanceStore
from dispatcher.governance.store_zookeeper import open_zookeeper_store
from dispatcher.sharding.membership import MembershipConfig

__all__ = ["open_governance_store"]


def open_governance_store(
    config: MembershipConfig,
    kind: str,
    *,
    max_history: int = DEFAULT_MAX_HISTORY,
    max_body: int = DEFAULT_MAX_BODY,
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
    memory: MemoryGovernance | None = None,
) -> AbstractAsyncContextManager[GovernanceStore]:
    """The store of ``kind`` documents where ``config`` keeps membership, open for the
    duration of the ``async with``. ``memory`` is the process's shared state for kind memory
    (a fresh one if None)."""
    check_kind(kind)
    if config.kind == "zookeeper":
        return open_zookeeper_store(
            config.address,
            config.root,
            kind,
            max_history=max_history,
            max_body=max_body,
            request_timeout=request_timeout,
            session_timeout=config.session_timeout,
            tls=config.tls,
            sasl=config.sasl,
        )
    if config.kind == "etcd":
        # MembershipConfig has already checked that the address is host:port.
        host, _, port = config.address.rpartition(":")
        return open_etcd_store(
            host,
            int(port),
            config.root,
            kind,
            max_history=max_history,
            max_body=max_body,
            request_timeout=request_timeout,
            tls=config.tls,
        )
    if config.kind != "memory":
        raise ValueError(f"membership kind {config.kind!r} has no governance store")
    shared = memory if memory is not None else MemoryGovernance()

    @asynccontextmanager
    async def opened() -> AsyncIterator[GovernanceStore]:
        yield MemoryGovernanceStore(shared, kind, max_history=max_history, max_body=max_body)

    return opened()

"""Governance: documents that say how services are called (policies; mesh settings later),
kept versioned and audited in the store the Dispatchers share, and published to every face.

* :mod:`~dispatcher.governance.policy`: the policy model, its parsing, rendering and diff;
* :mod:`~dispatcher.governance.store`: the versioned store (ZooKeeper, etcd, memory backends);
* :mod:`~dispatcher.governance.feed`: the current version held in memory, as a stream.
"""

__all__: list[str] = []

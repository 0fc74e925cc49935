"""The sidecar proxy (``zkgate proxy``).

It asks the Meta Server which Dispatcher owns each of its services,
subscribes there, and forwards its application's connections to healthy
endpoints. One concept per module:

* :mod:`proxy.endpoints` — the versioned endpoint table of a service;
* :mod:`proxy.balancer` — smooth weighted round robin, power of two choices;
* :mod:`proxy.outlier` — local ejection after consecutive connect failures;
* :mod:`proxy.policy` — a service's governance policy as the forwarder applies it;
* :mod:`proxy.forward` — listeners, connect with retries, the trio copy loop;
* :mod:`proxy.splicer` — the ``epoll`` engine's copying thread;
* :mod:`proxy.control` — Meta Server and Dispatcher sessions, shard moves, reports;
* :mod:`proxy.sidecar` — the wiring of one proxy process;
* :mod:`proxy.cli` — the command line.

It imports nothing of zkgate but :mod:`dispatcher` (the protocol, its client, and the
policy model).
"""

"""Dispatcher shards: who owns which service, and the membership store they agree through.

``assignment`` (weighted rendezvous hashing with bounded loads, pure),
``membership`` (Dispatchers registered in ZooKeeper or etcd, the catalog and
warm markers), ``ownership`` (one Dispatcher's share and its handovers),
``wiring`` (a gateway joined to its shard) and ``follower`` (the services other
shards own, followed from their owners for faces that cannot redirect their
clients, such as xDS). The Meta Server reads the same
membership and computes the same assignment; it imports these, never the
other way round.
"""

"""What clients see of the core: the snapshot as ZooKeeper znodes (``projection``),
as the subscription protocol proxies speak (``subscription_server``), and as
metrics, health and status pages over HTTP (``admin``). The ZooKeeper face
itself (codec, engine, tree, mirror) is :mod:`dispatcher.zk`.
"""

"""The Dispatcher's core: registries in, one versioned snapshot out.

``upstream`` (the interface every adapter implements, and the layout lookup),
``model`` (instances, health, sources), ``snapshot`` (immutable versions and
their deltas), ``fanin`` (upstreams merged into the snapshot),
``subscriptions`` and ``watch_index`` (who hears which change), ``ownership``
(which services this Dispatcher serves), ``health`` (the central checker's
verdicts). Nothing here knows a wire protocol: the faces
(:mod:`dispatcher.faces`, :mod:`dispatcher.zk`) render it for clients.
"""

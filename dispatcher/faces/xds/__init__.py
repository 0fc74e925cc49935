"""The xDS face: Envoy and proxyless gRPC take their endpoints from the Dispatcher.

``resources`` (model to Envoy resources), ``cache`` (encoded once per
change, one hub subscription per service), ``stream`` (one ADS stream's
protocol state, sans I/O), ``server`` (grpcio in a thread, trio owning the
state), ``handoff`` (batched calls between the two threads), ``config`` (the
``[xds]`` table), ``metrics``.
"""

from dispatcher.faces.xds.config import XdsConfig, XdsLimits, parse_xds
from dispatcher.faces.xds.metrics import XdsMetrics
from dispatcher.faces.xds.server import XdsServer

__all__ = ["XdsConfig", "XdsLimits", "XdsMetrics", "XdsServer", "parse_xds"]

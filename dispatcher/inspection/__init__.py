"""Inspection: continuous proof that every layer shows what the registries hold.

Each layer of caches between a registry and a client (the fan-in's view of
each upstream, each projection's znodes) is compared with the layer it is
made from, on a schedule and on demand; a difference that outlives the
grace period is a divergence: logged, counted, shown on ``/status`` and,
on the schedule, repaired by resyncing just that service. See
:mod:`dispatcher.inspection.inspector`.
"""

from dispatcher.inspection.config import InspectionConfig, parse_inspection
from dispatcher.inspection.inspector import Inspector
from dispatcher.inspection.model import Divergence, LayerStats, PassReport

__all__ = [
    "Divergence",
    "InspectionConfig",
    "Inspector",
    "LayerStats",
    "PassReport",
    "parse_inspection",
]

"""Alias of :mod:`keras_mmfusion.layer_statistics`, which holds the solver and routing
statistics that layers record as Keras metrics.

Every public name of that module is re-exported here, so ``keras_mmfusion.metrics``
imports keep working; new code imports from :mod:`keras_mmfusion.layer_statistics`.
"""

from keras_mmfusion.layer_statistics import (
    RoutingMetric,
    SolverStatsMetric,
    collecting_solver_stats,
    gather_replicas,
    logged_prefix,
    recording_statistics,
    report_solver_stats,
    statistics_paused,
)

__all__ = [
    "RoutingMetric",
    "SolverStatsMetric",
    "collecting_solver_stats",
    "gather_replicas",
    "logged_prefix",
    "recording_statistics",
    "report_solver_stats",
    "statistics_paused",
]

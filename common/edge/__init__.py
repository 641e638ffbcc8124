"""Akida at the edge: hardware mapping, CPU latency and on-chip incremental learning."""

from .latency import measure_latency
from .learning import (
    EDGE_HEAD,
    add_classes,
    as_akida_images,
    edge_learning_eval,
    learn,
    learning_params,
    predict_classes,
    prepare_edge_learning,
    save_model_atomic,
    spike_counts,
)
from .mapping import DEVICE_NAMES, ENERGY_NOTE, MappingReport, make_device, map_model

__all__ = [
    "DEVICE_NAMES",
    "EDGE_HEAD",
    "ENERGY_NOTE",
    "MappingReport",
    "add_classes",
    "as_akida_images",
    "edge_learning_eval",
    "learn",
    "learning_params",
    "make_device",
    "map_model",
    "measure_latency",
    "predict_classes",
    "prepare_edge_learning",
    "save_model_atomic",
    "spike_counts",
]

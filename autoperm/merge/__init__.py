"""Merging: interpolation of aligned weights, BatchNorm statistics reset, REPAIR / RESCALE
(`repair`), bias calibration and bias removal (`bias`)."""

from .bias import calibrate_biases, count_layers, remove_biases
from .interpolate import average_states, check_compatible, interpolate_state
from .normalize import reset_batchnorm

__all__ = ["check_compatible", "interpolate_state", "average_states", "reset_batchnorm", "count_layers",
           "calibrate_biases", "remove_biases"]

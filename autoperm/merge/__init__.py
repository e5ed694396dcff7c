"""Merging: interpolation of aligned weights and BatchNorm statistics reset."""

from .interpolate import check_compatible, interpolate_state
from .normalize import reset_batchnorm

__all__ = ["check_compatible", "interpolate_state", "reset_batchnorm"]

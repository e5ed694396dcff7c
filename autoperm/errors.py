"""Exception hierarchy of autoperm (a leaf module: it imports nothing from the package).

Every error names what went wrong (the parameter, node, group or tensor) and says what to do.
"""

from __future__ import annotations

__all__ = [
    "AutopermError",
    "TraceError",
    "ExampleInputError",
    "UnsupportedOpError",
    "AnalysisError",
    "SpecError",
    "ShapeMismatchError",
    "PermutationError",
    "UnsoundSpecError",
]


class AutopermError(Exception):
    """Base class of every error autoperm raises on purpose."""


class TraceError(AutopermError):
    """The model could not be captured as an ATen graph (torch.export failed)."""


class ExampleInputError(AutopermError, ValueError):
    """The example inputs are malformed, or the model raised when called on them."""


class UnsupportedOpError(AutopermError):
    """Raised only when a caller asks for strictness; by default unknown ops are frozen."""


class AnalysisError(AutopermError):
    """An internal inconsistency in the analysis (a rule tied atoms of different sizes)."""


class SpecError(AutopermError, ValueError):
    """A PermutationSpec is malformed, or does not fit the model it is used with."""


class ShapeMismatchError(SpecError):
    """A tensor named by a spec is missing from the model or has another shape."""


class PermutationError(AutopermError, ValueError):
    """A permutation passed to `permute` is missing, extra, of the wrong length or not a permutation."""


class UnsoundSpecError(AutopermError):
    """The float64 check found a group whose permutation changes the model's function."""

"""autoperm: compile the permutation symmetries of any PyTorch model, and use them.

Public API (see docs/api.md)::

    spec = autoperm.trace(model, example_inputs)          # PermutationSpec, verified
    perms = autoperm.random_permutation(spec, seed=0)     # {group name: LongTensor}
    model_p = autoperm.permute(model, spec, perms)        # new module, same function
"""

from .api import trace
from .curve import Curve, accuracy_barrier, interpolate, loss_barrier
from .diagnose import Diagnosis, DiagnosisRow, diagnose, repair
from .errors import (AnalysisError, AutopermError, ExampleInputError, PermutationError, ShapeMismatchError,
                     SpecError, TraceError, UnsoundSpecError, UnsupportedOpError)
from .match import Alignment
from .many import merge_many
from .merging import align, match, merge
from .metrics import Coverage, coverage
from .permute import compose, identity_permutation, invert, permute, permute_state_dict, random_permutation
from .rules import RULES, RuleContext, register_rule
from .rewrite import insert_perm_layers
from .rewrite.partial import Partial
from .spec import Axis, Frozen, PermGroup, PermutationSpec
from .verify import VerifyReport, check_equivalence, perturbed, verify_spec

__version__ = "0.1.0"


def _submodules_on(fn, package: str) -> None:
    """``autoperm.match`` and ``autoperm.merge`` are functions that shadow the subpackages of the
    same name; give each function its subpackage's modules as attributes, so that
    ``autoperm.match.weight.last_profile`` and ``import autoperm.merge.repair as r`` work."""
    import importlib
    import pkgutil

    pkg = importlib.import_module(package)
    for info in pkgutil.iter_modules(pkg.__path__):
        if not hasattr(fn, info.name):
            setattr(fn, info.name, importlib.import_module(f"{package}.{info.name}"))


_submodules_on(match, "autoperm.match")
_submodules_on(merge, "autoperm.merge")


def __getattr__(name: str):
    """Modules not imported by ``import autoperm`` (``autoperm.zoo``, ``autoperm.viz``,
    ``autoperm.cli``, ...) load on first use, as the docs write them (PEP 562)."""
    import importlib
    import importlib.util

    if name.isidentifier() and not name.startswith("__"):
        try:
            found = importlib.util.find_spec(f"{__name__}.{name}") is not None
        except ImportError:
            found = False
        if found:
            return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "trace", "interpolate", "Curve", "loss_barrier", "accuracy_barrier", "match", "align", "merge", "merge_many", "Alignment", "permute", "permute_state_dict", "random_permutation", "identity_permutation", "invert",
    "compose", "register_rule", "RULES", "RuleContext", "PermutationSpec", "PermGroup", "Axis", "Frozen",
    "check_equivalence", "coverage", "Coverage", "verify_spec", "perturbed", "AutopermError", "TraceError", "ExampleInputError",
    "UnsupportedOpError", "AnalysisError", "SpecError", "ShapeMismatchError", "PermutationError",
    "UnsoundSpecError", "insert_perm_layers", "Partial", "diagnose", "Diagnosis", "DiagnosisRow", "repair", "VerifyReport",
    "__version__",
]

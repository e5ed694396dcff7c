"""The emitter: turn an (edited) ATen graph plus tensors into a real, picklable ``nn.Module``.

Rewrites (PFM, partial merging, permutation layers; DESIGN.md section 4, "Rewrites emit a real
nn.Module") change the architecture, so they cannot return a module of the caller's class. They
build a ``torch.fx.Graph`` and call `emit`, which returns a ``torch.fx.GraphModule``:

* built node by node on a plain root module (no ``ep.module()``, whose local lambda cannot be
  pickled): ``torch.save(module)`` / ``torch.load(path, weights_only=False)`` work in a fresh
  process that has torch but need not import autoperm;
* every tensor is registered under its dotted key as a parameter (floating point) or a buffer
  (integer tensors, and the keys named in ``buffers``), inside plain ``nn.Module`` containers, so
  ``state_dict()`` has the same keys as ``tensors`` (a key part that is not a valid attribute name
  is sanitized; ``module.autoperm_keys`` maps each state_dict key back to the original key);
  keys starting with ``_constants`` (keyless tensors: non-persistent buffers, lifted constants)
  become non-persistent buffers, as in the source model;
* ``forward`` takes the graph's placeholders (the user's inputs) in order and returns ``out_spec``'s
  structure (e.g. a bare tensor instead of the exported 1-tuple);
* it runs on batch sizes other than the example's: exported graphs with a dynamic batch carry
  ``sym_size`` nodes; for a statically exported graph pass ``static_batch=n`` and the leading
  literal ``n`` of every view / reshape / expand size whose input has batch ``n`` is replaced by
  the input's ``sym_size`` (spatial sizes and sequence lengths stay as traced);
* optionally checked numerically after construction (`check_module`): against ``expected``
  outputs, and on a batch one larger than the example's (rows must not depend on the batch).

API::

    graph, tensors = graph_from_traced(tg)      # a copy: parameters / buffers become get_attr
    ...                                        # edit graph / tensors (widen, patch sizes)
    module = emit(graph, tensors, buffers=buffer_keys(model), out_spec=spec,
                  check_inputs=example_inputs, expected=reference_outputs)
    param_count(module); flop_count(module, example_inputs); print(module.code)

Example (a two-layer MLP rebuilt from its own export, DESIGN.md section 4)::

    tg = capture(nn.Sequential(nn.Linear(4, 8), nn.ReLU()), torch.randn(2, 4))
    graph, tensors = graph_from_traced(tg)
    m = emit(graph, tensors)           # m.state_dict() keys: '0.weight', '0.bias'
    m(torch.randn(5, 4))               # batch 5 works; torch.save(m, path) works
"""

from __future__ import annotations

import keyword
import logging
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn
from torch.utils._pytree import TreeSpec, tree_flatten, tree_unflatten

from ..errors import AutopermError
from ..frontend import TracedGraph
from ..rules.base import packet_name as _packet

__all__ = ["EmitError", "emit", "graph_from_traced", "buffer_keys", "check_module", "param_count",
           "flop_count", "original_state_dict", "output_spec"]

log = logging.getLogger(__name__)

_VIEWS = {"view", "_unsafe_view", "reshape", "expand"}
CONSTANTS = "_constants"  # key prefix of keyless tensors (non-persistent buffers, lifted constants)
_RESERVED = set(dir(torch.fx.GraphModule)) | {"graph", "code", "autoperm_keys", "training"}


class EmitError(AutopermError, ValueError):
    """The graph or tensors handed to `emit` cannot make a working module."""


def _part(name: str) -> str:
    out = "".join(c if (c.isalnum() or c == "_") else "_" for c in name) or "_"
    if out[0].isdigit() and not out.isdigit():
        out = "_" + out
    if keyword.iskeyword(out) or out in _RESERVED:
        out += "_"
    return out


def _sanitize(keys: Iterable[str]) -> dict[str, str]:
    """original key -> a dotted key whose every part is a usable attribute name; unique."""
    out: dict[str, str] = {}
    taken: set[str] = set()
    for key in keys:
        new = ".".join(_part(p) for p in str(key).split("."))
        base, i = new, 1
        while new in taken:
            new, i = f"{base}_{i}", i + 1
        taken.add(new)
        out[key] = new
    # a key that is a prefix of another (a tensor with "children") cannot be registered
    prefixes = {k.rsplit(".", i)[0] for k in taken for i in range(1, k.count(".") + 1)}
    clash = sorted(taken & prefixes)
    if clash:
        raise EmitError(f"tensor key {clash[0]!r} is also a module path of another key; rename one")
    return out


def buffer_keys(model: nn.Module) -> set[str]:
    """The state_dict keys of ``model`` that are buffers (registered as buffers by `emit`)."""
    return {k for k, _ in model.named_buffers(remove_duplicate=False)}


def graph_from_traced(tg: TracedGraph, *, const_prefix: str = "_constants."
                      ) -> tuple[torch.fx.Graph, dict[str, torch.Tensor]]:
    """A copy of ``tg.graph`` in which every parameter / buffer placeholder is a ``get_attr``
    node whose target is its state_dict key, and every keyless constant one whose target is
    ``const_prefix + placeholder``. Returns the graph and the constants (keyless tensors); the
    caller adds the state_dict tensors. User inputs stay placeholders."""
    graph, consts, _ = _graph_from_traced(tg, const_prefix=const_prefix)
    return graph, consts


def _graph_from_traced(tg: TracedGraph, *, const_prefix: str = "_constants."):
    """`graph_from_traced` plus the map from ``tg``'s nodes to the copy's."""
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    consts: dict[str, torch.Tensor] = {}
    attrs: list[tuple[torch.fx.Node, str]] = []
    for node in tg.graph.nodes:
        if node.op == "placeholder" and node.name in tg.user_inputs:
            env[node] = graph.node_copy(node, lambda n: env[n])
        elif node.op == "placeholder":
            attrs.append((node, tg.state_keys.get(node.name) or const_prefix + node.name))
            if node.name not in tg.state_keys:
                if node.name not in tg.constants:
                    raise EmitError(f"placeholder {node.name!r} has neither a state_dict key nor a stored value")
                consts[const_prefix + node.name] = tg.constants[node.name]
    last = next(iter(reversed(graph.nodes)), None)
    for node, target in attrs:
        with graph.inserting_after(last) if last is not None else graph.inserting_before(None):
            new = graph.get_attr(target)
        new.meta = dict(node.meta)
        env[node] = last = new
    for node in tg.graph.nodes:
        if node.op != "placeholder":
            env[node] = graph.node_copy(node, lambda n: env[n])
    return graph, consts, env


def output_spec(outputs: Any) -> TreeSpec:
    """The pytree structure of a model's outputs, to pass to `emit` as ``out_spec``."""
    return tree_flatten(outputs)[1]


def _restructure(graph: torch.fx.Graph, out_spec: TreeSpec | None) -> None:
    out = next(n for n in reversed(graph.nodes) if n.op == "output")
    flat = out.args[0]
    if out_spec is None:
        return
    flat = list(flat) if isinstance(flat, (tuple, list)) else [flat]
    if out_spec.num_leaves != len(flat):
        raise EmitError(f"out_spec has {out_spec.num_leaves} leaves but the graph returns {len(flat)} values")
    try:
        structured = tree_unflatten(flat, out_spec)
    except Exception as e:  # pragma: no cover - exotic containers
        raise EmitError(f"cannot rebuild the output structure {out_spec}: {e}") from e
    if out_spec.num_leaves == 1 and out_spec.is_leaf():
        structured = flat[0]
    elif not isinstance(structured, (tuple, list, dict)) or type(structured) not in (tuple, list, dict):
        log.info("output container %s is not a plain tuple / list / dict: returning a flat tuple",
                 type(structured).__name__)
        structured = tuple(flat)
    out.args = (structured,)


def _unpin_batch(graph: torch.fx.Graph, batch: int) -> int:
    """Replace a literal leading ``batch`` in view-like sizes by a ``sym_size`` of the input."""
    patched = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or _packet(node) not in _VIEWS or len(node.args) < 2:
            continue
        src, size = node.args[0], node.args[1]
        val = src.meta.get("val") if isinstance(src, torch.fx.Node) else None
        if not (isinstance(size, (list, tuple)) and size and size[0] == batch and isinstance(size[0], int)):
            continue
        if val is None or not hasattr(val, "shape") or not val.shape or val.shape[0] != batch:
            continue
        with graph.inserting_before(node):
            dyn = graph.call_function(torch.ops.aten.sym_size.int, (src, 0))
        node.args = (src, [dyn, *size[1:]], *node.args[2:])
        patched += 1
    log.debug("unpinned the batch size in %d view / reshape / expand nodes", patched)
    return patched


def _has_tensor(module: nn.Module, path: str) -> bool:
    owner = module
    for part in path.split("."):
        owner = getattr(owner, part, None)
        if owner is None:
            return False
    return isinstance(owner, torch.Tensor)


def emit(graph: torch.fx.Graph, tensors: Mapping[str, torch.Tensor], *, buffers: Iterable[str] = (),
         out_spec: TreeSpec | None = None, static_batch: int | None = None, class_name: str = "AutopermModule",
         check_inputs: Sequence[torch.Tensor] | None = None, expected: Any = None,
         tolerance: float | None = None) -> torch.fx.GraphModule:
    """Build a picklable ``GraphModule`` from ``graph`` whose ``get_attr`` targets are keys of
    ``tensors`` (see the module docstring). ``graph`` and ``tensors`` are not modified; tensors
    are cloned (detached). With ``check_inputs`` the module is run after construction and, if
    ``expected`` is given, compared to it (`check_module`)."""
    if not isinstance(graph, torch.fx.Graph):
        raise EmitError(f"graph must be a torch.fx.Graph, got {type(graph).__name__}")
    buffers = set(buffers)
    used = [n.target for n in graph.nodes if n.op == "get_attr"]
    missing = sorted({t for t in used if t not in tensors})
    if missing:
        raise EmitError(f"graph reads tensors that are not in tensors=: {missing[:5]}")
    bad = [n for n in graph.nodes if n.op in ("call_module", "call_method")]
    if bad:
        raise EmitError(f"emit takes ATen graphs of call_function nodes; {bad[0].op} node {bad[0].name!r} found")
    wanted = set(used)
    names = _sanitize([k for k in tensors if k in wanted])  # the caller's order
    root = nn.Module()
    for key, new in names.items():
        t = tensors[key]
        if not isinstance(t, torch.Tensor):
            raise EmitError(f"tensors[{key!r}] is a {type(t).__name__}, not a Tensor")
        owner = root
        *path, leaf = new.split(".")
        for p in path:
            if not hasattr(owner, p):
                owner.add_module(p, nn.Module())
            owner = getattr(owner, p)
        t = t.detach().clone()
        if str(key).startswith(CONSTANTS):  # keyless in the source model: kept out of the state_dict
            owner.register_buffer(leaf, t, persistent=False)
        elif t.is_floating_point() and key not in buffers:
            owner.register_parameter(leaf, nn.Parameter(t, requires_grad=True))
        else:
            owner.register_buffer(leaf, t)
    new_graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in graph.nodes:
        env[node] = new_graph.node_copy(node, lambda n: env[n])
        if node.op == "get_attr":
            env[node].target = names[node.target]
    if static_batch is not None:
        _unpin_batch(new_graph, int(static_batch))
    _restructure(new_graph, out_spec)
    new_graph.eliminate_dead_code()
    new_graph.lint()
    module = torch.fx.GraphModule(root, new_graph, class_name=class_name)
    # GraphModule copies only the tensors the graph reads (an unused num_batches_tracked is gone)
    module.autoperm_keys = {new: key for key, new in names.items() if _has_tensor(module, new)}
    module.eval()
    if check_inputs is not None:
        err = check_module(module, check_inputs, expected, tolerance=tolerance)
        log.info("emitted %s: %d parameters, check error %.2e", class_name, param_count(module), err)
    return module


def _scale_tolerance(outputs: Any) -> float:
    leaves = [t for t in tree_flatten(outputs)[0] if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return 1e-9 if leaves and all(t.dtype == torch.float64 for t in leaves) else 1e-4


def _rel_error(ref: Any, got: Any) -> float:
    from ..verify import output_error

    return output_error(ref, got)


@torch.no_grad()
def check_module(module: nn.Module, inputs: Sequence[torch.Tensor], expected: Any = None, *,
                 tolerance: float | None = None) -> float:
    """Run ``module`` on ``inputs`` (and on a batch one larger) and return the relative error to
    ``expected`` (0.0 when none). Raises `EmitError` when the error exceeds ``tolerance`` (1e-9
    for float64 outputs, else 1e-4) or when the module fails on the larger batch."""
    inputs = tuple(inputs)
    out = module(*inputs)
    err = 0.0
    tol = tolerance if tolerance is not None else _scale_tolerance(out)
    if expected is not None:
        err = _rel_error(expected, out)
        if not err <= tol:
            raise EmitError(f"the emitted module differs from the expected outputs: relative error "
                            f"{err:.2e} > {tol:g}")
    if inputs and all(t.dim() > 0 for t in inputs) and len({t.shape[0] for t in inputs}) == 1:
        bigger = tuple(torch.cat([t, t[:1]]) for t in inputs)
        try:
            big = module(*bigger)
        except Exception as e:
            raise EmitError(f"the emitted module fails on batch {bigger[0].shape[0]} (example batch "
                            f"{inputs[0].shape[0]}): {type(e).__name__}: {e}") from e
        n = inputs[0].shape[0]
        head = [t[:n] if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == n + 1 else t
                for t in tree_flatten(big)[0]]
        drift = _rel_error(tree_flatten(out)[0], head)
        if not drift <= tol:
            log.warning("the emitted module's rows depend on the batch (relative drift %.2e)", drift)
    return err


def param_count(module: nn.Module) -> int:
    """Number of parameter elements of ``module``, each shared tensor counted once."""
    seen: set[int] = set()
    total = 0
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


@torch.no_grad()
def flop_count(module: nn.Module, inputs: Any) -> int:
    """FLOPs of one forward pass on ``inputs`` (a Tensor or a tuple), counted by
    ``torch.utils.flop_counter.FlopCounterMode`` (matrix products and convolutions; a
    multiply-add counts 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    counter = FlopCounterMode(display=False)
    with counter:
        module(*inputs)
    return int(counter.get_total_flops())


def original_state_dict(module: torch.fx.GraphModule) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` under the original keys given to `emit`."""
    names = getattr(module, "autoperm_keys", {})
    return {names.get(k, k): v for k, v in module.state_dict().items()}

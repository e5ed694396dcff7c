"""The frontend: capture a model as ONE ATen-level graph with torch.export.

`capture(model, example_inputs)` deep-copies the model, puts the copy in eval mode, exports it
with ``torch.export.export(strict=False)`` and a dynamic batch dimension (so views and reshapes
do not bake in the example's batch size), then functionalizes with
``run_decompositions({})``. The rules are keyed on what that produces: functional ATen ops
(``aten.conv2d``, ``aten.linear``, ``aten.layer_norm``, ``aten.scaled_dot_product_attention``,
``aten._native_batch_norm_legit_no_training`` + ``getitem``, ``aten.view`` for flatten, no
in-place variants, no dropout).

The result, a `TracedGraph`, maps graph placeholders to state_dict keys, knows which
placeholders have no key (non-persistent buffers, lifted constants), which names are tied to one
storage, and where each node came from (module path, source line) for messages.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ._capture_checks import attribute_tensors, batch_reason, kept_caches, relaid_keys
from ._args import as_inputs, check_module
from .batch_twin import batch_size, grown_inputs, twin_sizes
from ._copy import copy_module
from ._split_stacked import split_stacked
from .errors import ExampleInputError, TraceError

__all__ = ["TracedGraph", "capture", "normalize_inputs", "node_origin"]

log = logging.getLogger(__name__)


@dataclass
class TracedGraph:
    """An exported, functionalized ATen graph plus what the analysis needs to name tensors."""

    graph_module: torch.fx.GraphModule
    state_keys: dict[str, str]          # placeholder name -> state_dict key (params, persistent buffers)
    keyless: dict[str, str]             # placeholder name -> why it has no state_dict key
    user_inputs: list[str]              # placeholder names of the forward's tensor arguments
    shapes: dict[str, tuple[int, ...]]  # state_dict key -> shape, for every key of the model
    tied: dict[str, list[str]] = field(default_factory=dict)
    frontend: str = "torch.export"
    dynamic_batch: bool = True
    constants: dict[str, torch.Tensor] = field(default_factory=dict)  # keyless placeholder -> value
    # keyless placeholders that are registered non-persistent buffers the forward never writes to (not
    # lifted tensor attributes, which may be caches derived from parameters, e.g. timm LeViT's
    # attention-bias cache)
    buffers: frozenset[str] = frozenset()
    # graph outputs that are only the new value of a buffer the forward writes to (output node name
    # -> the buffer's placeholder name): the analysis ties them to the buffer instead of freezing them
    writes: dict[str, str] = field(default_factory=dict)
    # state_dict keys the eager forward changed without the graph recording it (``.data =``, a write
    # behind a Python flag, a hook) -> why: the analysis freezes them
    unrecorded: dict[str, str] = field(default_factory=dict)
    # a graph exported at a fixed batch: that batch, and the same model exported at two other
    # batch sizes (`autoperm.batch_twin`); the analysis keeps only the groups all graphs agree on
    static_batch: int | None = None
    twins: list = field(default_factory=list)

    @property
    def graph(self) -> torch.fx.Graph:
        return self.graph_module.graph


def normalize_inputs(example_inputs: Any) -> tuple[torch.Tensor, ...]:
    """Example inputs as a tuple of tensors (a Tensor, or a tuple / list of Tensors)."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)) and example_inputs and all(
            isinstance(t, torch.Tensor) for t in example_inputs):
        return tuple(example_inputs)
    raise ExampleInputError(
        "example_inputs must be a Tensor or a non-empty tuple of Tensors (the forward's positional "
        f"arguments); got {type(example_inputs).__name__}")


def node_origin(node: torch.fx.Node) -> str:
    """Where a graph node came from: ``"layer3.0 (model.py:88)"`` as far as known."""
    parts = []
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        parts.append(path.replace("L['self'].", "").replace("L__self__.", "") or "<root>")
    trace = node.meta.get("stack_trace")
    if trace:
        lines = [ln.strip() for ln in trace.strip().splitlines() if ln.strip().startswith("File ")]
        user = [ln for ln in lines if "/torch/" not in ln]
        lines = user or lines
        if lines:
            loc = lines[-1].split(",")
            fname = loc[0].replace("File ", "").strip().strip('"').rsplit("/", 1)[-1]
            line = loc[1].strip().replace("line ", "") if len(loc) > 1 else "?"
            parts.append(f"({fname}:{line})")
    return " ".join(parts) if parts else node.name


def _tied_names(model: nn.Module) -> dict[str, list[str]]:
    """Canonical name -> other names, for tensors registered under several names."""
    by_id: dict[int, list[str]] = {}
    for name, t in list(model.named_parameters(remove_duplicate=False)) + list(
            model.named_buffers(remove_duplicate=False)):
        by_id.setdefault(id(t), []).append(name)
    return {names[0]: names[1:] for names in by_id.values() if len(names) > 1}


def _batched(inputs: tuple[torch.Tensor, ...]) -> tuple[tuple[torch.Tensor, ...], bool]:
    """Inputs whose batch dim can be exported as dynamic: a batch of 1 is repeated to 2."""
    if any(t.dim() == 0 for t in inputs):
        return inputs, False
    sizes = {t.shape[0] for t in inputs}
    if len(sizes) != 1:
        return inputs, False
    if sizes == {1}:
        inputs = tuple(t.expand(2, *t.shape[1:]).clone() for t in inputs)
    return inputs, True


def _user_frame(exc: BaseException) -> str:
    """The innermost traceback frame outside torch, as ``file:line (code)``."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if "/torch/" not in f.filename and "/autoperm/" not in f.filename]
    if not frames:
        return ""
    f = frames[-1]
    return f" at {f.filename.rsplit('/', 1)[-1]}:{f.lineno} ({(f.line or '').strip()})"


# torch loggers that print the partly exported graph on a failed export (several times, as autoperm
# retries with a static batch); autoperm's own error names the cause and the user's line instead
_NOISY = ("torch.fx.experimental.symbolic_shapes", "torch._dynamo", "torch.export", "torch._export")


def _export(model: nn.Module, inputs: tuple[torch.Tensor, ...], dynamic: bool):
    dyn = tuple({0: torch.export.Dim.AUTO} for _ in inputs) if dynamic else None
    quiet = not log.isEnabledFor(logging.DEBUG)  # autoperm at DEBUG: let torch speak
    loggers = [logging.getLogger(n) for n in _NOISY]
    levels = [lg.level for lg in loggers]
    printed = io.StringIO()  # torch prints a failed export's partial graph to stderr itself
    try:
        if quiet:
            for lg in loggers:
                lg.setLevel(logging.ERROR)
        with contextlib.redirect_stderr(printed) if quiet else contextlib.nullcontext():
            ep = torch.export.export(model, inputs, dynamic_shapes=dyn, strict=False)
    except Exception:
        if printed.getvalue():
            log.debug("torch.export printed:\n%s", printed.getvalue())
        raise
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
    if printed.getvalue():  # a successful export's own messages still reach stderr
        sys.stderr.write(printed.getvalue())
    return ep


def capture(model: nn.Module, example_inputs: Any) -> TracedGraph:
    """Export a deep copy of ``model`` in eval mode; the caller's model is never touched.

    Example::

        tg = capture(nn.Sequential(nn.Linear(4, 8), nn.ReLU()), torch.randn(2, 4))
        tg.state_keys   # {'p_0_weight': '0.weight', 'p_0_bias': '0.bias'}
    """
    check_module(model, "model")
    inputs = as_inputs(normalize_inputs(example_inputs), "example_inputs=")  # refuses an empty batch
    lazy = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
            if torch.nn.parameter.is_lazy(t)]
    if lazy:
        raise TraceError(f"{type(model).__name__} has uninitialized lazy parameters ({', '.join(lazy[:4])}"
                         f"{', ...' if len(lazy) > 4 else ''}): call the model once on a batch to materialize "
                         "them, then trace it")
    try:
        work = copy_module(model).eval()
    except Exception as e:
        raise TraceError(
            f"could not copy {type(model).__name__} (autoperm never traces the caller's model "
            f"itself): {type(e).__name__}: {e}. Legacy hooks such as nn.utils.weight_norm block "
            "deepcopy; use torch.nn.utils.parametrizations.weight_norm instead.") from e
    before, attrs = _fingerprints(work), attribute_tensors(work)
    try:
        with torch.no_grad():
            work(*(t.clone() for t in inputs))  # a forward may write to its inputs: not the caller's
        after = _fingerprints(work)
    except Exception as e:
        shapes = [tuple(t.shape) for t in inputs]
        raise ExampleInputError(
            f"the model raised when called on the example inputs (shapes {shapes}): "
            f"{type(e).__name__}: {e}. Pass inputs the model's forward accepts.") from e
    # models that cache tensors computed from their weights in eval-mode forward (timm's LeViT
    # and EfficientFormer attention biases) clear the cache in train(): clear what the check
    # just filled, so that export traces the computation instead of lifting a constant
    work.eval()
    stale = kept_caches(model, work, inputs, attrs)
    batched, dynamic = _batched(inputs)
    snapshot = copy_module(work) if dynamic and batched is not inputs else None  # the state export sees
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        # a forward cache refilled while exporting the throw-away copy (see above)
        warnings.filterwarnings("ignore", message="The tensor attribute .* was assigned during export")
        ep, dynamic = _export_program(model, work, inputs, batched, dynamic)
        batch_why = batch_reason(ep, snapshot, inputs) if dynamic and snapshot is not None else None
    tg = _wrap(ep, model, dynamic)
    recorded = set(ep.graph_signature.buffers_to_mutate.values())
    tg.unrecorded = {k: "written in forward outside the traced graph (.data =, a Python-flag branch or a hook)"
                     for k, v in before.items() if after.get(k) != v and k not in recorded}
    if tg.unrecorded:
        log.warning("the forward changed %s without torch.export recording the write: frozen",
                    sorted(tg.unrecorded))
    if stale:
        log.warning("the forward caches tensors in %s that depend on the weights and outlive calls (train() / "
                    "eval() do not clear them): every dim is frozen", stale)
        why = (f"the forward caches tensors computed from the weights in {', '.join(stale[:3])}, which a permuted "
               "or merged copy would keep; clear them in train() (as timm's LeViT does) to make the model permutable")
        tg.unrecorded.update({k: why for k in tg.state_keys.values()})
    if not dynamic:
        _attach_twins(tg, model, work, inputs)
    if batch_why:
        log.warning("%s: every dim is frozen", batch_why)
        tg.unrecorded.update({k: batch_why for k in tg.state_keys.values()})
    relaid = relaid_keys(model, tg.state_keys.values())
    if relaid:
        log.warning("the state_dict entries %s are not the module's own tensors: frozen", sorted(relaid))
        tg.unrecorded.update(relaid)
    return tg


def _attach_twins(tg: TracedGraph, model: nn.Module, work: nn.Module, inputs) -> None:
    """For a graph exported at a fixed batch: export the model again at the first two sizes of
    `autoperm.batch_twin.twin_sizes` it runs at, into ``tg.twins``. One that runs but cannot be
    exported freezes every dim; a model that runs at no other size keeps its spec, with a warning."""
    batch = batch_size(inputs)
    if batch is None:
        return
    tg.static_batch = batch
    for size in twin_sizes(batch):
        more = grown_inputs(inputs, size)
        try:
            with torch.no_grad():
                copy_module(work)(*(t.clone() for t in more))
        except Exception as e:
            log.debug("the model raises at batch %d: %s: %s", size, type(e).__name__, e)
            continue
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", category=FutureWarning)
                ep = _export(copy_module(work), more, False).run_decompositions({})
        except Exception as e:
            why = (f"the graph fixes the batch at {batch} and could not be exported at batch {size} "
                   f"({type(e).__name__}) to check which groups hold at other batch sizes")
            log.warning("%s: every dim is frozen", why)
            tg.unrecorded.update({k: why for k in tg.state_keys.values()})
            return
        twin = _wrap(ep, model, False)
        twin.static_batch = size
        tg.twins.append(twin)
        if len(tg.twins) == 2:
            break
    if tg.twins:
        log.info("the graph fixes the batch at %d: compiled again at batch %s to keep only groups that hold at all",
                 batch, " and ".join(str(t.static_batch) for t in tg.twins))
    else:
        log.warning("the graph fixes the batch at %d and the model raises at every other batch size tried (%s): "
                    "the spec is checked at batch %d only", batch, twin_sizes(batch), batch)


def _fingerprints(model: nn.Module) -> dict[str, tuple]:
    """Per state_dict tensor: storage, version counter and shape (any in-place write or swap moves one)."""
    def storage(t: torch.Tensor) -> int:
        try:
            return t.data_ptr()
        except RuntimeError:  # a tensor without storage (sparse, some subclasses): its identity
            return id(t)

    return {k: (storage(v), v._version, tuple(v.shape)) for k, v in model.state_dict(keep_vars=True).items()
            if isinstance(v, torch.Tensor)}


def _export_program(model: nn.Module, work: nn.Module, inputs, batched, dynamic: bool):
    try:
        try:
            ep = _export(work, batched, dynamic)
        except Exception as first:  # a dynamic batch can fail where a static one works
            if not dynamic:
                raise
            log.info("export with a dynamic batch failed (%s); retrying with a static batch",
                     str(first).splitlines()[0] if str(first) else type(first).__name__)
            ep, dynamic = _export(work, inputs, False), False
        if dynamic and not _symbolic_batch(ep):  # Dim.AUTO specialized it: int(x.shape[0]) and the like
            log.info("torch.export fixed the batch size (the forward makes a Python int of it?); "
                     "exporting at the example's batch instead")
            ep, dynamic = _export(work, inputs, False), False
        ep = ep.run_decompositions({})
    except Exception as e:
        head = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise TraceError(
            f"torch.export could not capture {type(model).__name__}{_user_frame(e)}: "
            f"{type(e).__name__}: {head}. Common causes: data-dependent control flow (replace Python "
            "branches on tensor values with torch.where / torch.cond), one tensor registered under two "
            "names or written to two buffers, writes through .data or hooks; or trace a submodule "
            "that has none of these.") from e
    return ep, dynamic


def _symbolic_batch(ep) -> bool:
    """Whether every user input's batch dim is symbolic in the exported program."""
    from torch.export.graph_signature import InputKind

    users = {s.arg.name for s in ep.graph_signature.input_specs if s.kind == InputKind.USER_INPUT}
    vals = [n.meta.get("val") for n in ep.graph_module.graph.nodes if n.op == "placeholder" and n.name in users]
    return all(isinstance(v, torch.Tensor) and v.dim() > 0 and isinstance(v.shape[0], torch.SymInt)
               and not v.shape[0].node.expr.is_number for v in vals)  # a SymInt specialized to a number


def _wrap(ep, model: nn.Module, dynamic: bool) -> TracedGraph:
    from torch.export.graph_signature import InputKind

    split_stacked(ep.graph_module)  # fused qkv: one chain per slice, so q / k and v get own atoms
    sd = model.state_dict()
    state_keys: dict[str, str] = {}
    keyless: dict[str, str] = {}
    constants: dict[str, torch.Tensor] = {}
    stored = {**ep.state_dict, **ep.constants}
    user_inputs: list[str] = []
    for spec in ep.graph_signature.input_specs:
        name = spec.arg.name
        if spec.kind == InputKind.USER_INPUT:
            user_inputs.append(name)
        elif spec.kind in (InputKind.PARAMETER, InputKind.BUFFER) and spec.target in sd:
            state_keys[name] = spec.target
        elif spec.kind == InputKind.BUFFER:
            keyless[name] = f"non-persistent buffer {spec.target!r} has no state_dict key"
            if spec.target in stored:
                constants[name] = stored[spec.target]
        else:
            keyless[name] = f"{spec.kind.name.lower()} {spec.target!r} has no state_dict key"
            if spec.target in stored:
                constants[name] = stored[spec.target]
    shapes = {k: tuple(v.shape) for k, v in sd.items() if isinstance(v, torch.Tensor)}
    has_users = {n.name for n in ep.graph_module.graph.nodes if n.op == "placeholder" and n.users}
    used = {key for name, key in state_keys.items() if name in has_users}
    tied = {}
    for first, rest in _tied_names(model).items():
        names = [first, *rest]
        canon = next((n for n in names if n in used), first)
        tied[canon] = [n for n in names if n != canon]
    # a buffer the forward writes to is constant at capture time only: a later call may see any value
    mutated = set(ep.graph_signature.buffers_to_mutate.values())
    buffers = frozenset(s.arg.name for s in ep.graph_signature.input_specs
                        if s.kind == InputKind.BUFFER and s.arg.name in keyless and s.target not in mutated)
    return TracedGraph(ep.graph_module, state_keys, keyless, user_inputs, shapes, tied,
                       "torch.export", dynamic, constants, buffers, _buffer_writes(ep))


def _buffer_writes(ep) -> dict[str, str]:
    """Output node name -> buffer placeholder name, for outputs that only carry a buffer's new value."""
    from torch.export.graph_signature import InputKind, OutputKind

    placeholder = {s.target: s.arg.name for s in ep.graph_signature.input_specs if s.kind == InputKind.BUFFER}
    out = next(n for n in reversed(ep.graph_module.graph.nodes) if n.op == "output")
    args = out.args[0] if isinstance(out.args[0], (tuple, list)) else (out.args[0],)
    writes: dict[str, str] = {}
    other: set[str] = set()
    for spec, arg in zip(ep.graph_signature.output_specs, args):
        if not isinstance(arg, torch.fx.Node):
            continue
        if spec.kind == OutputKind.BUFFER_MUTATION and spec.target in placeholder:
            writes[arg.name] = placeholder[spec.target]
        else:
            other.add(arg.name)
    return {k: v for k, v in writes.items() if k not in other}

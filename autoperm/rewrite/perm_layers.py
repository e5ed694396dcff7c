"""Permutation layers on identity skip connections (the Distill-and-Merge thesis, ../papers/000,
section 5 "Permutation Layer", Figure 2 and Tables 4-5; DESIGN.md section 3).

An identity skip ``y = x + f(x)`` ties the channels of ``x`` and ``y`` into one permutation group,
so a whole stage of residual blocks (or a transformer's residual stream) shares one permutation.
`insert_perm_layers` puts a learnable square matrix ``P`` (initialized to the identity) on each
such skip, ``y = P x + f(x)``, as a bias-free 1x1 convolution (channels in dim 1) or a bias-free
linear map (channels last). ``P``'s input dim joins ``x``'s group and its output dim ``y``'s, so
each block gets its own group. The function is unchanged (checked in float64). After alignment
``P`` holds the relative permutation; after interpolation it is a general square matrix.

Which adds are identity skips is read from the graph: an add of two values that depend on the
input, where one operand ``x`` is used directly and the other depends on ``x`` through at least one
conv / linear layer. Only adds whose channel dim lies in a permutation group get a layer (a frozen
dim has nothing to split). The new weight's key is ``<block>.skip_perm.weight`` (``<block>`` the
module that performed the add), or ``skip_perms.<i>.weight`` at the top level.

The result is an emitted module (`autoperm.rewrite.emit`): eval-mode semantics (BatchNorm uses its
running statistics), runs at the traced spatial size / sequence length, any batch size.

Example (the thesis' Table 5: one more group per identity block)::

    model2, spec2 = autoperm.insert_perm_layers(resnet, torch.randn(2, 3, 32, 32))
    len(spec2.groups) > len(autoperm.trace(resnet, x).groups)        # True
    merged = autoperm.merge(model2_a, model2_b)                       # like any other model
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from torch import nn

from .._copy import copy_module
from ..analysis import analyze_with_sites
from ..frontend import capture, normalize_inputs
from ..verify import output_error, to_float64
from .emit import EmitError, _graph_from_traced, buffer_keys, emit, output_spec
from .pfm import _is_residual_add, _dense_depth, data_nodes, dense_nodes

__all__ = ["insert_perm_layers", "identity_skips"]

log = logging.getLogger(__name__)


def identity_skips(tg) -> list[tuple[torch.fx.Node, torch.fx.Node]]:
    """``(add, x)`` for each residual add whose operand ``x`` is an identity skip (see the module
    docstring), in graph order."""
    data = data_nodes(tg)
    dense = set(dense_nodes(tg))
    out = []
    for node in tg.graph.nodes:
        if node.op != "call_function" or not _is_residual_add(node, data):
            continue
        a, b = node.args[0], node.args[1]
        for x, other in ((a, b), (b, a)):
            if x is other:
                continue
            depth = _dense_depth(tg, x, node, dense)
            if depth.get(other, 0) >= 1:
                out.append((node, x))
                break
    return out


def _block_path(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return path.replace("L['self'].", "").replace("L__self__.", "").replace("L['self']", "")


def _channel_dim(add: torch.fx.Node, sites) -> tuple[int, int] | None:
    """(dim, size) of the add's output that lies whole in one permutation group, if any."""
    val = add.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return None
    for group_sites in sites.values():
        for s in group_sites:
            if (s.node == add.name and s.offset == 0 and s.outer == 1 and s.inner == 1
                    and 0 < s.dim < val.dim()):
                return s.dim, int(val.shape[s.dim])
    return None


def insert_perm_layers(model: nn.Module, example_inputs: Any, *, verify: bool = True):
    """A new model with an identity-initialized permutation layer on every identity skip
    connection, and its `PermutationSpec` (``autoperm.trace`` of the new model). ``model`` is
    never modified. Raises ``ValueError`` if the model has no identity skip to split."""
    from ..api import trace

    inputs = normalize_inputs(example_inputs)
    tg = capture(model, inputs)
    _, sites = analyze_with_sites(tg)
    graph, consts, env = _graph_from_traced(tg)
    tensors: dict[str, torch.Tensor] = {**model.state_dict(), **consts}
    taken = set(tensors)
    added = []
    for i, (add, x) in enumerate(identity_skips(tg)):
        where = _channel_dim(add, sites)
        val = x.meta.get("val")
        if where is None or not isinstance(val, torch.Tensor) or not val.is_floating_point():
            log.info("skip at %s: channel dim not in a permutation group; no layer inserted", add.name)
            continue
        dim, c = where
        nd = val.dim()
        if dim == nd - 1:
            op, shape = torch.ops.aten.linear.default, (c, c)
        elif dim == 1 and nd in (3, 4, 5):
            op = {3: torch.ops.aten.conv1d.default, 4: torch.ops.aten.conv2d.default,
                  5: torch.ops.aten.conv3d.default}[nd]
            shape = (c, c) + (1,) * (nd - 2)
        else:
            log.info("skip at %s: channel dim %d of a %d-d value; no layer inserted", add.name, dim, nd)
            continue
        block = _block_path(add)
        key = f"{block}.skip_perm.weight" if block else f"skip_perms.{i}.weight"
        if key in taken or any(k.startswith(key.rsplit(".", 1)[0] + ".") for k in taken):
            key = f"skip_perms.{i}.weight"
        taken.add(key)
        tensors[key] = torch.eye(c, dtype=val.dtype, device=val.device).reshape(shape)
        new_add, new_x = env[add], env[x]
        with graph.inserting_before(new_add):
            w = graph.get_attr(key)
            perm = graph.call_function(op, (new_x, w))
        perm.meta = {"val": x.meta.get("val")}
        new_add.args = tuple(perm if a is new_x else a for a in new_add.args)
        added.append(key)
    if not added:
        raise ValueError("insert_perm_layers: the model has no identity skip connection whose channels form a "
                         "permutation group (nothing to split)")
    with torch.no_grad():
        ref_model = copy_module(model).eval()
        outputs = ref_model(*inputs)
    model2 = emit(graph, tensors, buffers=buffer_keys(model), out_spec=output_spec(outputs),
                  static_batch=None if tg.dynamic_batch else inputs[0].shape[0],
                  class_name=f"{type(model).__name__}WithPermLayers", check_inputs=inputs, expected=outputs)
    if verify:
        _check_float64(ref_model, model2, inputs)
    log.info("inserted %d permutation layers: %s", len(added), added)
    return model2, trace(model2, inputs, verify=verify)


@torch.no_grad()
def _check_float64(ref: nn.Module, model2: nn.Module, inputs) -> None:
    m64 = copy.deepcopy(model2).double()
    r64 = ref.double()
    err = output_error(r64(*to_float64(inputs)), m64(*to_float64(inputs)))
    if not err <= 1e-9:
        raise EmitError(f"inserting permutation layers changed the model's function (float64 rel. error {err:.2e})")

"""Fused projections split per slice: q / k and v get their own head_dim groups, soundly."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import autoperm
from autoperm._stats import run_graph
from autoperm.frontend import capture
from helpers import float64_inputs
from zoo import Attention


class HeadsLast(nn.Module):
    """The stacked dim is not the leading factor of the split: the pass must leave it alone."""

    def __init__(self, dim=8, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, self.heads, 3, c // self.heads).permute(3, 0, 2, 1, 4)
        y = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(y.transpose(1, 2).reshape(b, n, c))


class MHA(nn.Module):
    def __init__(self, dim=8, heads=2):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


def _qkv_groups(spec, weight):
    return {g.name: g for g in spec.groups if any(ax.tensor == weight and ax.dim == 0 for ax in g.axes)}


def _assert_sound(model, spec, x):
    m64 = autoperm.perturbed(model, 0)
    for seed in range(3):
        perms = autoperm.random_permutation(spec, seed, derangement=True)
        assert autoperm.check_equivalence(m64, spec, perms, float64_inputs((x,))) < 1e-9


def test_timm_style_qkv_gets_separate_head_dim_groups_for_qk_and_v():
    model, x = Attention(8, 2).eval(), torch.randn(2, 5, 8)
    spec = autoperm.trace(model, x)
    groups = _qkv_groups(spec, "qkv.weight")
    sizes = sorted(g.size for g in groups.values())
    assert sizes == [2, 4, 4], sizes  # heads, head_dim of q / k, head_dim of v
    v_group = next(g for g in groups.values() if g.size == 4 and any(ax.tensor == "proj.weight" for ax in g.axes))
    assert {ax.offset for ax in v_group.axes if ax.tensor == "qkv.weight"} == {16}  # the v slice only
    qk_group = next(g for g in groups.values() if g.size == 4 and g is not v_group)
    assert {ax.offset for ax in qk_group.axes if ax.tensor == "qkv.weight"} == {0, 8}
    _assert_sound(model, spec, x)
    # negative control: the q / k head_dim permutation applied to q alone changes the output
    lone = autoperm.PermutationSpec([autoperm.PermGroup(qk_group.name, 4, [ax for ax in qk_group.axes if ax.offset == 0])],
                                    [], dict(spec.shapes), dict(spec.tied))
    perms = autoperm.random_permutation(lone, 0, derangement=True)
    assert autoperm.check_equivalence(autoperm.perturbed(model, 0), lone, perms, float64_inputs((x,))) > 1e-3


def test_multihead_attention_in_proj_is_split_too():
    model, x = MHA().eval(), torch.randn(2, 5, 8)
    spec = autoperm.trace(model, x)
    assert sorted(g.size for g in _qkv_groups(spec, "attn.in_proj_weight").values()) == [2, 4, 4]
    _assert_sound(model, spec, x)


def test_rewritten_graph_computes_the_same_values():
    model, x = Attention(8, 2).eval(), torch.randn(3, 5, 8)
    tg = capture(model, x)
    ops = [str(n.target) for n in tg.graph_module.graph.nodes]
    assert "aten.split_with_sizes.default" in ops and "aten.unbind.int" not in ops
    state = model.state_dict()
    last = next(n for n in tg.graph_module.graph.nodes if n.op == "output").args[0][0].name
    out = run_graph(tg, state, (x,), {last})[last]
    assert torch.allclose(out, model(x), atol=1e-6)


def test_non_leading_stack_is_left_alone_and_sound():
    model, x = HeadsLast().eval(), torch.randn(2, 5, 8)
    tg = capture(model, x)
    assert "aten.split_with_sizes.default" not in [str(n.target) for n in tg.graph_module.graph.nodes]
    spec = autoperm.trace(model, x)
    _assert_sound(model, spec, x)

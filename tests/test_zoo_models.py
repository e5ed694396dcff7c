"""Representative torchvision / timm models, randomly initialized, at 64x64: the compiled spec is
verified sound in float64 (every parameter and buffer perturbed), non-trivial, and a sampled
single-axis permutation changes the output (negative control)."""

from __future__ import annotations

import pytest
import torch

import autoperm
from autoperm.zoo import load
from helpers import float64_inputs, single_axis_spec

MODELS = [
    "torchvision:resnet18",
    "torchvision:mobilenet_v3_small",
    "timm:convnext_atto",
    "torchvision:efficientnet_b0",
    "torchvision:regnet_x_400mf",
    "torchvision:densenet121",
    "torchvision:shufflenet_v2_x0_5",
    "torchvision:swin_t",
    "timm:vit_tiny_patch16_224",
    "timm:mixer_s16_224",
]


@pytest.mark.parametrize("name", MODELS)
def test_zoo_model_spec_is_sound_and_useful(name):
    model, x = load(name, image_size=64)
    spec = autoperm.trace(model, x)  # raises UnsoundSpecError if the float64 check fails
    assert spec.meta["verify_error"] < 1e-9
    cov = autoperm.coverage(spec, model)
    assert cov.param_share >= 0.9 and cov.hidden_share >= 0.7, (cov, spec.frozen_reasons())
    assert any(g.size >= 2 for g in spec.groups)
    m64 = autoperm.perturbed(model, 1)
    for g in sorted(spec.groups, key=lambda g: -len(g.axes))[:3]:  # the most shared groups
        axis = g.axes[0]  # where the group is produced (a layer's output dim)
        sub = single_axis_spec(spec, g, axis)
        err = autoperm.check_equivalence(m64, sub, autoperm.random_permutation(sub, 0, derangement=True),
                                         float64_inputs(x))
        # float64 round-off here is ~1e-15; deep random nets damp some changes (layer scale 1e-6)
        assert err > 1e-11, f"permuting only {axis} of {g.name} left {name} unchanged ({err:.1e})"


def test_vit_gets_head_and_head_dim_groups():
    model, x = load("timm:vit_tiny_patch16_224", image_size=64)
    spec = autoperm.trace(model, x, verify=False)
    layouts = {(g.name, g.size, a.offset, a.outer, a.inner) for g, a in spec.axes_of("blocks.0.attn.qkv.weight")
               if a.dim == 0}
    heads = {(o, out, i) for _, s, o, out, i in layouts if s == 3}
    assert heads == {(0, 1, 64), (192, 1, 64), (384, 1, 64)}, "3 heads of 64 in each of q, k, v"
    head_dim = {}
    for name, s, o, out, i in layouts:
        if s == 64:
            head_dim.setdefault(name, set()).add((o, out, i))
    # one head_dim group shared by q and k, another by v (and the output projection)
    assert sorted(map(sorted, head_dim.values())) == [[(0, 3, 1), (192, 3, 1)], [(384, 3, 1)]]


@pytest.mark.parametrize("name, kwargs", [
    ("timm:eva02_tiny_patch14_224", {"depth": 2}),
    ("timm:samvit_base_patch16", {"depth": 2, "embed_dim": 96, "num_heads": 3, "global_attn_indexes": (1,),
                                  "window_size": 2}),
])
def test_rope_and_rel_pos_vits_get_head_and_v_head_dim_groups(name, kwargs):
    """EVA-02 (RoPE, non-persistent table): heads and v / proj head_dim, q / k head_dim frozen.
    SAM-ViT (heads folded into the batch, shared rel-pos tables): heads, q / k and v head_dim."""
    model, x = load(name, image_size=64, **kwargs)
    spec = autoperm.trace(model, x)
    assert spec.meta["verify_error"] < 1e-9
    layouts = {(g.size, a.offset, a.outer, a.inner) for g, a in spec.axes_of("blocks.0.attn.qkv.weight") if a.dim == 0}
    e = 192 if "eva02" in name else 96
    h, d = (3, 64) if "eva02" in name else (3, 32)
    assert {(h, o, 1, d) for o in (0, e, 2 * e)} <= layouts, layouts  # heads of q, k and v
    assert (d, 2 * e, h, 1) in layouts  # head_dim of v
    assert ((d, 0, h, 1) in layouts) == ("samvit" in name)  # q / k head_dim: frozen by EVA's RoPE table


@pytest.mark.parametrize("name", ["torchvision:mobilenet_v3_small", "timm:deit_tiny_patch16_224"])
def test_weight_matching_recovers_a_permuted_copy_where_the_identity_start_sticks(name):
    """Random inits with BatchNorm / LayerNorm weights of one and biases of zero give the descent
    from the identity little signal: on these models it settled with most groups wrong. The
    default now also runs the invariant start when B's tensors have A's norms (a permuted copy)
    and the identity start fell short of |A| |B|, and recovers every permutation. On a random
    pair (norms differ) nothing more runs."""
    from autoperm.match import weight as weight_module

    model, x = load(name, image_size=64)
    spec = autoperm.trace(model, x, verify=False)
    planted = autoperm.random_permutation(spec, seed=3, derangement=True)
    copy = autoperm.permute(model, spec, planted)
    truth = autoperm.invert(planted, spec)
    stuck = autoperm.match(model, copy, spec, starts=1).perms   # control: the identity start alone
    assert sum(not torch.equal(stuck[g], truth[g]) for g in truth) > len(truth) // 2
    found = autoperm.match(model, copy, spec)
    assert weight_module.last_profile["starts"] == 2   # the identity start, then the independent one
    assert weight_module.last_profile.get("sorted", 0) > 0  # units matched by sorting, not by an assignment
    assert all(torch.equal(found.perms[g], truth[g]) for g in truth)
    other, _ = load(name, image_size=64)
    autoperm.match(model, other, spec)
    assert weight_module.last_profile["starts"] == 1

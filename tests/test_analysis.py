"""The compiled partitions against hand-written Git Re-Basin-style specs, and structural facts."""

from __future__ import annotations

import pytest
import torch

import autoperm
from helpers import canonical
from zoo import ZOO, ResNet20


def _ax(t, d, offset=0, outer=1, inner=1):
    return (t, d, offset, outer, inner)


def _bn(prefix):
    return [_ax(f"{prefix}.{n}", 0) for n in ("weight", "bias", "running_mean", "running_var")]


def trace_zoo(name):
    factory, inputs = ZOO[name]
    return autoperm.trace(factory(), inputs(), verify=False)


def test_mlp_matches_hand_written_spec():
    expected = {frozenset([_ax("0.weight", 0), _ax("0.bias", 0), _ax("2.weight", 1)]),
                frozenset([_ax("2.weight", 0), _ax("2.bias", 0), _ax("4.weight", 1)])}
    assert canonical(trace_zoo("mlp")) == expected


def test_vgg_matches_hand_written_spec():
    def conv_bn(c, b, nxt, inner=1):
        return frozenset([_ax(f"{c}.weight", 0), _ax(f"{c}.bias", 0), *_bn(b), _ax(f"{nxt}.weight", 1, inner=inner)])

    expected = {conv_bn("0", "1", "3"), conv_bn("3", "4", "7"), conv_bn("7", "8", "12", inner=4),
                frozenset([_ax("12.weight", 0), _ax("12.bias", 0), _ax("14.weight", 1)])}
    assert canonical(trace_zoo("vgg")) == expected


def resnet20_hand_spec(blocks: int) -> set[frozenset]:
    """git-re-basin's resnet20_permutation_spec, written out for tests/zoo.py's ResNet20."""
    groups: dict[str, list] = {"bg0": [_ax("conv1.weight", 0), *_bn("bn1")]}
    i = 0
    for stage in range(3):
        for b in range(blocks):
            p = f"layers.{i}"
            src, dst = (f"bg{stage - 1}" if (stage > 0 and b == 0) else f"bg{stage}"), f"bg{stage}"
            groups.setdefault(dst, [])
            groups[src].append(_ax(f"{p}.conv1.weight", 1))
            groups[f"inner{i}"] = [_ax(f"{p}.conv1.weight", 0), *_bn(f"{p}.bn1"), _ax(f"{p}.conv2.weight", 1)]
            groups[dst] += [_ax(f"{p}.conv2.weight", 0), *_bn(f"{p}.bn2")]
            if stage > 0 and b == 0:
                groups[src].append(_ax(f"{p}.shortcut.0.weight", 1))
                groups[dst] += [_ax(f"{p}.shortcut.0.weight", 0), *_bn(f"{p}.shortcut.1")]
            i += 1
    groups["bg2"].append(_ax("linear.weight", 1))
    return {frozenset(v) for v in groups.values()}


@pytest.mark.parametrize("blocks", [1, 2])
def test_resnet20_matches_hand_written_spec(blocks):
    spec = autoperm.trace(ResNet20(w=4, blocks=blocks), torch.randn(2, 3, 8, 8), verify=False)
    assert canonical(spec) == resnet20_hand_spec(blocks)


def test_interface_is_frozen_with_reasons():
    spec = trace_zoo("mlp")
    reasons = {(f.tensor, f.dim): f.reason for f in spec.frozen}
    assert reasons[("0.weight", 1)] == "model input"
    assert reasons[("4.weight", 0)] == "model output"
    assert reasons[("4.bias", 0)] == "model output"


def test_flatten_gives_block_layout():
    spec = trace_zoo("vgg")
    (group, axis), = [(g, a) for g, a in spec.axes_of("12.weight") if a.dim == 1]
    assert (group.size, axis.inner, axis.outer) == (12, 4, 1)
    frozen = {(f.size, f.outer, f.inner) for f in spec.frozen_of("12.weight") if f.dim == 1}
    assert frozen == {(2, 12, 2), (2, 24, 1)}, "the spatial factors of the flatten are frozen"


def test_concat_gives_offsets():
    spec = trace_zoo("densenet")
    offsets = sorted((a.offset, g.size) for g, a in spec.axes_of("fc.weight") if a.dim == 1)
    assert offsets == [(0, 6), (6, 4), (10, 4), (14, 4)]


def test_grouped_conv_has_group_and_within_group_axes():
    spec = trace_zoo("resnext")
    layouts = sorted((g.size, a.outer, a.inner) for g, a in spec.axes_of("1.c2.weight") if a.dim == 0)
    assert layouts == [(2, 4, 1), (4, 1, 2)], "groups=4 of 8 channels: group index (4) and within (2)"


def test_depthwise_conv_ties_input_and_output():
    spec = trace_zoo("mobilenetv2")
    (g0, _), = [(g, a) for g, a in spec.axes_of("3.block.3.weight") if a.dim == 0]
    tensors = {(a.tensor, a.dim) for a in g0.axes}
    assert ("3.block.0.weight", 0) in tensors and ("3.block.6.weight", 1) in tensors


def qkv_layout(spec, weight):
    """{group: (size, {(offset, outer, inner)})} on dim 0 of a fused [3E, E] projection."""
    out: dict = {}
    for g, a in spec.axes_of(weight):
        if a.dim == 0:
            out.setdefault(g.name, (g.size, set()))[1].add((a.offset, a.outer, a.inner))
    return sorted((size, sorted(lays)) for size, lays in out.values())


# E = 8, 2 heads of 4: one head group over q, k and v; head_dim shared by q and k; another for v
QKV = [(2, [(0, 1, 4), (8, 1, 4), (16, 1, 4)]), (4, [(0, 2, 1), (8, 2, 1)]), (4, [(16, 2, 1)])]


def test_vit_has_head_and_head_dim_groups():
    spec = trace_zoo("vit")
    assert qkv_layout(spec, "blocks.0.attn.qkv.weight") == QKV, "heads, q/k head_dim, v head_dim on the fused qkv"
    (v_group,) = [g for g, a in spec.axes_of("blocks.0.attn.qkv.weight") if a.dim == 0 and a.offset == 16
                  and a.outer == 2]
    assert ("blocks.0.attn.proj.weight", 1) in {(a.tensor, a.dim) for a in v_group.axes}, "v's head_dim meets proj"
    stream = {g.name for g, a in spec.axes_of("blocks.0.attn.qkv.weight") if a.dim == 1}
    assert {g.name for g, a in spec.axes_of("pos") if a.dim == 2} == stream, "position embedding on the stream"


def test_multihead_attention_heads():
    spec = trace_zoo("mha")
    assert qkv_layout(spec, "mha.in_proj_weight") == QKV


def test_tied_embedding_is_joined():
    spec = trace_zoo("tied_embedding")
    assert spec.tied == {"head.weight": ["emb.weight"]}
    (group,) = spec.groups
    assert ("head.weight", 1) in {(a.tensor, a.dim) for a in group.axes}
    assert "embedding rows" in {f.reason.split(" at ")[0]: f for f in spec.frozen_of("head.weight")}.popitem()[0]


def test_non_persistent_buffer_freezes_what_it_touches():
    spec = trace_zoo("buffer")
    reasons = {f.reason for f in spec.frozen_of("fc2.weight")}
    assert "non-persistent buffer 'shift' has no state_dict key" in reasons
    assert {a.tensor for g in spec.groups for a in g.axes} >= {"scale", "fc1.weight"}


def test_unused_parameter_is_reported():
    class WithAux(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2))
            self.aux = torch.nn.Linear(6, 3)  # an auxiliary head the forward never calls

        def forward(self, x):
            return self.net(x)

    model = WithAux()
    spec = autoperm.trace(model, torch.randn(2, 4))
    assert {f.reason for f in spec.frozen_of("aux.weight")} == {"unused in the traced forward"}
    assert len(spec.groups) == 1

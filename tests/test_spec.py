"""PermutationSpec: validate() per slot and factor, JSON round trip, load against a model, views."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import autoperm
from autoperm import Axis, Frozen, PermGroup, PermutationSpec, SpecError
from helpers import canonical
from zoo import ZOO


def small_spec():
    return PermutationSpec([PermGroup("h", 4, [Axis("a.weight", 0), Axis("b.weight", 1)])],
                           [Frozen("a.weight", 1, 3, "model input")],
                           {"a.weight": (4, 3), "b.weight": (2, 4)})


def test_valid_spec_passes():
    assert small_spec().validate() is not None


@pytest.mark.parametrize("mutate, message", [
    (lambda s: s.groups.append(PermGroup("h", 4, [])), "unique"),
    (lambda s: s.groups.append(PermGroup("g", 4, [Axis("a.weight", 0)])), "both act on slots"),
    (lambda s: s.frozen.append(Frozen("b.weight", 1, 4, "oops")), "both act on slots"),
    (lambda s: s.groups.append(PermGroup("g", 4, [Axis("c.weight", 0)])), "'c.weight'"),
    (lambda s: s.groups.append(PermGroup("g", 4, [Axis("a.weight", 2)])), "no dim 2"),
    (lambda s: s.groups.append(PermGroup("g", 2, [Axis("b.weight", 0, offset=1)])), "do not fit"),
    (lambda s: s.groups.append(PermGroup("g", 0, [])), "sizes must be"),
    (lambda s: s.groups.append(PermGroup("g", 2, [], parent="nope")), "not a group without a parent"),
    (lambda s: s.groups.append(PermGroup("g", 3, [Axis("a.weight", 1)], parent="h")), "not a multiple"),
    (lambda s: s.groups.append(PermGroup("g", 2, [Axis("b.weight", 0)], parent="h")), "not a multiple"),
])
def test_validate_names_the_violation(mutate, message):
    spec = small_spec()
    mutate(spec)
    with pytest.raises(SpecError, match=message):
        spec.validate()


def test_groups_may_share_a_dim_on_other_slots_or_factors():
    spec = PermutationSpec([PermGroup("c", 4, [Axis("fc.weight", 1, inner=9)]),
                            PermGroup("s1", 2, [Axis("fc2.weight", 1, offset=0)]),
                            PermGroup("s2", 3, [Axis("fc2.weight", 1, offset=2)])],
                           [Frozen("fc.weight", 1, 9, "spatial", outer=4)],
                           {"fc.weight": (5, 36), "fc2.weight": (2, 5)})
    spec.validate()


@pytest.mark.parametrize("name", ["resnet20", "vit", "densenet", "tied_embedding"])
def test_json_round_trip(tmp_path, name):
    factory, inputs = ZOO[name]
    model = factory()
    spec = autoperm.trace(model, inputs(), verify=False)
    path = tmp_path / "spec.json"
    spec.save(path)
    loaded = PermutationSpec.load(path, model)
    assert canonical(loaded) == canonical(spec)
    assert [g.name for g in loaded.groups] == [g.name for g in spec.groups]
    assert loaded.frozen == spec.frozen and loaded.shapes == spec.shapes and loaded.tied == spec.tied
    assert json.loads(path.read_text())["version"] == autoperm.spec.FORMAT_VERSION


def test_load_names_first_mismatching_tensor(tmp_path):
    factory, inputs = ZOO["mlp"]
    spec = autoperm.trace(factory(), inputs(), verify=False)
    spec.save(tmp_path / "s.json")
    other = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 13),
                                torch.nn.ReLU(), torch.nn.Linear(13, 3))
    with pytest.raises(autoperm.ShapeMismatchError, match=r"'2.weight' has shape \[13, 16\]"):
        PermutationSpec.load(tmp_path / "s.json", other)
    with pytest.raises(autoperm.ShapeMismatchError, match="lacks"):
        PermutationSpec.load(tmp_path / "s.json", torch.nn.Linear(6, 16))


def test_load_rejects_other_versions_and_garbage(tmp_path):
    data = small_spec().to_dict()
    data["version"] = 99
    (tmp_path / "v.json").write_text(json.dumps(data))
    with pytest.raises(SpecError, match="version 99"):
        PermutationSpec.load(tmp_path / "v.json")
    (tmp_path / "g.json").write_text("{not json")
    with pytest.raises(SpecError, match="not valid JSON"):
        PermutationSpec.load(tmp_path / "g.json")
    (tmp_path / "f.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(SpecError, match="not an autoperm spec"):
        PermutationSpec.load(tmp_path / "f.json")


def test_table_dot_and_networkx():
    factory, inputs = ZOO["vgg"]
    spec = autoperm.trace(factory(), inputs(), verify=False)
    table = spec.table()
    assert "12.weight" in table and "[10, 48]" in table and "model output" in table
    assert f"{len(spec.groups)} groups" in table
    dot = spec.to_dot().to_string()
    assert all(f'"g:{g.name}"' in dot for g in spec.groups)
    graph = spec.to_networkx()
    groups = [n for n, d in graph.nodes(data=True) if d["kind"] == "group"]
    assert len(groups) == len(spec.groups)
    assert graph.number_of_edges() == sum(len(g.axes) for g in spec.groups)


def test_group_lookup_error_lists_groups():
    with pytest.raises(SpecError, match=r"no group named 'zz'; groups are \['h'\]"):
        small_spec().group("zz")


def test_table_collapses_cells_with_many_slices():
    """A fused qkv dim listed every slice with its layout: cells of 250+ characters."""
    attn = nn.MultiheadAttention(16, 4, batch_first=True)
    spec = autoperm.trace(attn, (torch.randn(2, 5, 16),) * 3, hierarchical=True)
    table = spec.table()
    heads = next(g.name for g in spec.groups if any(h.parent == g.name for h in spec.groups))
    row = next(line for line in table.splitlines() if line.startswith("in_proj_weight "))
    assert f"{heads} x3" in row and " as (" not in row
    assert "acts on N slices" in table and max(len(line) for line in table.splitlines()) < 160


def test_frozen_reasons_can_merge_locations():
    """Two convs freeze their spatial dims at two places: one reason per place by default, one
    count without locations (what the CLI summary and the pictures show)."""
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Conv2d(4, 3, 3))
    spec = autoperm.trace(model, torch.randn(1, 2, 6, 6))
    placed = {r: n for r, n in spec.frozen_reasons().items() if r.startswith("convolution window")}
    merged = spec.frozen_reasons(locations=False)
    assert len(placed) == 2 and all(" at " in r for r in placed)
    assert merged["convolution window (spatial dims)"] == sum(placed.values())
    assert sum(merged.values()) == sum(spec.frozen_reasons().values()) == len(spec.frozen)


def test_table_elides_a_concatenation_of_many_groups():
    """A dim that concatenates many groups (DenseNet) listed every group name in its cell
    (densenet121: lines of 2096 characters); the cell now shows the first and last ones."""
    class Cat(nn.Module):
        def __init__(self):
            super().__init__()
            self.parts = nn.ModuleList(nn.Conv2d(2, 3, 1) for _ in range(7))
            self.head = nn.Conv2d(21, 4, 1)

        def forward(self, x):
            return self.head(torch.cat([p(x) for p in self.parts], 1))

    spec = autoperm.trace(Cat(), torch.randn(1, 2, 3, 3))
    row = next(line for line in spec.table().splitlines() if line.startswith("head.weight"))
    assert "parts.1" in row and "parts.6" in row and "... +4 groups ..." in row and "parts.2" not in row
    assert "the dim concatenates more groups than shown" in spec.table()
    assert len({g.name for g, _ in spec.axes_of("head.weight")}) == 7

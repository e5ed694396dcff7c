"""Compile the spec of a small CNN, look at it, permute the model, and check nothing changed."""

import torch
from torch import nn

import autoperm

model = nn.Sequential(
    nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
    nn.Conv2d(16, 32, 3, padding=1, groups=4), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
    nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10),
).eval()
x = torch.randn(2, 3, 8, 8)

spec = autoperm.trace(model, x)
print(spec.table())

perms = autoperm.random_permutation(spec, seed=0)
permuted = autoperm.permute(model, spec, perms)
err = (permuted(x) - model(x)).abs().max().item()
print(f"max difference after permuting: {err:.1e}")
assert err < 1e-4

changed = [k for k, v in permuted.state_dict().items() if not torch.equal(v, model.state_dict()[k])]
print(f"{len(changed)} tensors were moved, e.g. {changed[:3]}")
assert changed

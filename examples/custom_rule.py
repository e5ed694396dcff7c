"""Register a permutation rule for your own op, and see the check catch a wrong one."""

import torch
from torch import nn

import autoperm


@torch.library.custom_op("example::scaled_tanh", mutates_args=())
def scaled_tanh(x: torch.Tensor, s: float) -> torch.Tensor:
    return s * torch.tanh(x)


@scaled_tanh.register_fake
def _(x, s):
    return torch.empty_like(x)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x):
        return self.fc2(scaled_tanh(self.fc1(x), 2.0))


x = torch.randn(3, 4)
spec = autoperm.trace(Net(), x)
print("without a rule:", spec.meta["unsupported_ops"], "->", len(spec.groups), "groups")
assert spec.groups == []


@autoperm.register_rule(torch.ops.example.scaled_tanh.default)
def scaled_tanh_rule(ctx):
    """Elementwise: each output element depends only on the input element at its index."""
    return ctx.tie_all(ctx.atoms(ctx.arg("x")), ctx.out)


spec = autoperm.trace(Net(), x)
print("with the rule:", [(g.name, g.size) for g in spec.groups])
assert [g.size for g in spec.groups] == [8]

"""Train two MLPs on scikit-learn's digits from different seeds, then merge them: naive averaging
against weight matching. Runs in a few seconds on a CPU."""

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import autoperm

torch.set_num_threads(1)  # tiny models: extra threads cost more than they save

digits = load_digits()
x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
y = torch.tensor(digits.target)
perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
train, test = perm[:1400], perm[1400:]


def mlp():
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))


def fit(seed):
    torch.manual_seed(seed)
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for epoch in range(20):
        for idx in torch.randperm(len(train)).split(128):
            opt.zero_grad()
            F.cross_entropy(model(x[train[idx]]), y[train[idx]]).backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def accuracy(model):
    return (model(x[test]).argmax(1) == y[test]).float().mean().item()


a, b = fit(1), fit(2)
naive = autoperm.merge(a, b, method="identity")
matched = autoperm.merge(a, b, method="weight")
ends = (accuracy(a) + accuracy(b)) / 2
print(f"endpoints {accuracy(a):.3f} / {accuracy(b):.3f}; midpoint naive {accuracy(naive):.3f}, "
      f"weight matching {accuracy(matched):.3f}")
assert accuracy(matched) > accuracy(naive)
assert accuracy(matched) > ends - 0.15

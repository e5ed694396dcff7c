"""Partial merging (Partial Model Merging thesis, chapter 3): merge the units that match, keep a
share gamma of the least similar units of both models side by side (each hidden layer grows by
ceil(gamma * width) units). gamma = 0 is the full merge, gamma = 1 the ensemble (autoperm scales
the kept units' outgoing weights by 1 - alpha and alpha; see autoperm/rewrite/partial.py).
Two MLPs trained on scikit-learn's digits; about 20 s on one CPU thread."""

import time

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import autoperm
from autoperm.rewrite import param_count
from autoperm.rewrite.partial import partial_merge

torch.set_num_threads(1)
t0 = time.perf_counter()

digits = load_digits()
x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
y = torch.tensor(digits.target)
perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
train, test = perm[:1400], perm[1400:]


def mlp():
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                         nn.Linear(64, 10))


def fit(seed, epochs=15):
    torch.manual_seed(seed)
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(epochs):
        for idx in torch.randperm(len(train)).split(64):
            opt.zero_grad()
            F.cross_entropy(model(x[train[idx]]), y[train[idx]]).backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def accuracy(model):
    return (model(x[test]).argmax(1) == y[test]).float().mean().item()


a, b = fit(1), fit(2)
calib = list(x[train[:512]].split(128))
al = autoperm.match(a, b, method="activation", data=calib)
full = autoperm.merge(a, b, alignment=al)
with torch.no_grad():
    ensemble = 0.5 * (a(x[test]) + b(x[test]))
base = param_count(a)
print(f"endpoints {accuracy(a):.3f} / {accuracy(b):.3f}, full merge {accuracy(full):.3f}, "
      f"ensemble {(ensemble.argmax(1) == y[test]).float().mean().item():.3f}")

print(f"{'gamma':>5}  {'params':>7}  {'x model':>7}  accuracy")
accs, outputs = {}, {}
for gamma in (0.0, 0.1, 0.25, 0.5, 1.0):
    merged = partial_merge(a, b, al, partial=gamma, data=calib)  # = autoperm.merge(..., partial=gamma)
    accs[gamma] = accuracy(merged)
    with torch.no_grad():
        outputs[gamma] = merged(x[test])
    print(f"{gamma:>5}  {param_count(merged):>7}  {param_count(merged) / base:>7.2f}  {accs[gamma]:.3f}")
with torch.no_grad():
    gap_full = (outputs[0.0] - full(x[test])).abs().max().item()
gap_ens = (outputs[1.0] - ensemble).abs().max().item()
print(f"partial=0 against the full merge: max |difference| {gap_full:.1e}; "
      f"partial=1 against the ensemble: {gap_ens:.1e}")
via_merge = autoperm.merge(a, b, alignment=al, partial=0.25, data=calib)
print(f"autoperm.merge(..., partial=0.25): {accuracy(via_merge):.3f}; total {time.perf_counter() - t0:.0f} s")

assert gap_full < 1e-5, gap_full  # partial=0 is the full merge
assert gap_ens < 1e-4, gap_ens  # an MLP meets only unit-local ops: partial=1 is the ensemble
assert accs[0.5] > accs[0.0], accs  # keeping the least similar units of both helps

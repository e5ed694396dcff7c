"""Preserve-First Merging (the Vanishing Feature paper, section 4.4): keep the first l counted
conv / linear layers of both models unmerged (run side by side on the same input), merge their
outputs, and run the interpolated rest. l = 0 is the ordinary merge, l = L (all counted layers)
the ensemble. Two deep MLPs trained on scikit-learn's digits; about 20 s on one CPU thread."""

import time

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import autoperm
from autoperm.rewrite import param_count

torch.set_num_threads(1)
t0 = time.perf_counter()

digits = load_digits()
x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
y = torch.tensor(digits.target)
perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
train, test = perm[:1400], perm[1400:]


def mlp(width=64, depth=6):
    layers = [nn.Linear(64, width), nn.ReLU()]
    for _ in range(depth - 2):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


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
base = param_count(a)
al = autoperm.match(a, b, method="weight")  # align once, build every merge from it
with torch.no_grad():
    ensemble = 0.5 * (a(x[test]) + b(x[test]))
ens_acc = (ensemble.argmax(1) == y[test]).float().mean().item()
print(f"endpoints {accuracy(a):.3f} / {accuracy(b):.3f}, ensemble {ens_acc:.3f} ({2 * base} parameters)")

L = autoperm.merge(a, b, alignment=al, preserve_first=1).autoperm_pfm["counted_layers"]
print(f"{'preserve_first':>14}  {'params':>7}  {'x model':>7}  accuracy")
accs = {}
for l in range(L + 1):
    merged = autoperm.merge(a, b, alignment=al, preserve_first=l)  # l = 0: the ordinary merge
    accs[l] = accuracy(merged)
    print(f"{l:>14}  {param_count(merged):>7}  {param_count(merged) / base:>7.2f}  {accs[l]:.3f}")
    if l == L:
        with torch.no_grad():
            gap = (merged(x[test]) - ensemble).abs().max().item()
        print(f"preserve_first={L} (all counted layers) against the ensemble: max |difference| {gap:.1e}")
print(f"total {time.perf_counter() - t0:.0f} s")

assert gap < 1e-5, gap  # PFM with every layer preserved is exactly the ensemble
assert accs[L - 1] > accs[0], accs  # preserving early layers helps the merge

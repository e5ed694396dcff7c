"""Distill and Merge (Distill-and-Merge thesis, section 6): train a teacher on scikit-learn's
digits, distill two smaller students from it with different seeds (KL divergence on softened
logits, Hinton et al.; weight decay, which the thesis finds makes students merge better), then
merge the students with autoperm. About 25 s on one CPU thread."""

import time

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import autoperm

torch.set_num_threads(1)
t0 = time.perf_counter()

digits = load_digits()
x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
y = torch.tensor(digits.target)
perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
train, test = perm[:1400], perm[1400:]


def mlp(width, depth=3):
    layers = [nn.Linear(64, width), nn.ReLU()]
    for _ in range(depth - 2):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


def train_model(model, loss_of, seed, epochs, weight_decay=0.0):
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=weight_decay)
    for _ in range(epochs):
        for idx in torch.randperm(len(train)).split(64):
            opt.zero_grad()
            loss_of(model, x[train[idx]], y[train[idx]]).backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def accuracy(model):
    return (model(x[test]).argmax(1) == y[test]).float().mean().item()


torch.manual_seed(0)
teacher = train_model(mlp(512), lambda m, xb, yb: F.cross_entropy(m(xb), yb), seed=0, epochs=20)
T = 4.0  # temperature of the softened logits


def distill_loss(student, xb, yb):
    with torch.no_grad():
        soft = F.log_softmax(teacher(xb) / T, dim=1)
    kl = F.kl_div(F.log_softmax(student(xb) / T, dim=1), soft, log_target=True, reduction="batchmean")
    return kl * T * T  # (Hinton: the T^2 keeps gradients comparable across temperatures)


students = []
for seed in (1, 2):
    torch.manual_seed(seed)  # a different initialization per student
    students.append(train_model(mlp(128, depth=4), distill_loss, seed=seed, epochs=20, weight_decay=1e-2))
a, b = students
calib = list(x[train[:512]].split(128))

merged = autoperm.merge(a, b, method="weight")
repaired = autoperm.merge(a, b, method="activation", normalize="repair", data=calib)
naive = autoperm.merge(a, b, method="identity")
mean_students = (accuracy(a) + accuracy(b)) / 2
print(f"teacher {accuracy(teacher):.3f} ({sum(p.numel() for p in teacher.parameters())} parameters)")
print(f"students {accuracy(a):.3f} / {accuracy(b):.3f} ({sum(p.numel() for p in a.parameters())} parameters each)")
print(f"merged students: naive average {accuracy(naive):.3f}, weight matching {accuracy(merged):.3f}, "
      f"activation matching + REPAIR {accuracy(repaired):.3f}")
print(f"total {time.perf_counter() - t0:.0f} s")

# measured over student seeds (1, 2), (3, 4), (5, 6): merges 0.7 to 1.7 points below the students'
# mean, naive averaging 18 to 37 points below the weight-matching merge
assert accuracy(merged) > mean_students - 0.04, (accuracy(merged), mean_students)
assert accuracy(repaired) > mean_students - 0.04, (accuracy(repaired), mean_students)
assert accuracy(merged) > accuracy(naive) + 0.1, (accuracy(merged), accuracy(naive))

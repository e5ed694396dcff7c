"""Merge quality on scikit-learn's digits (or mnist1d): pairs trained from different seeds, merged by naive
averaging, weight matching, activation matching, Sinkhorn matching (weight-distance objective,
and midpoint-loss objective as "sinkhorn_loss") and the straight-through estimator ("ste"), each
without normalization and with RESET (BatchNorm models) / REPAIR / RESCALE / regression.

Usage: python benchmarks/merge_quality.py [--models mlp512,resnet20x4] [--epochs 30] [--steps 300]
       [--methods identity,weight,activation,sinkhorn,sinkhorn_loss,ste] [--dataset digits|mnist1d]
Writes benchmarks/results/merge_quality.md and merge_quality.json (``--dataset mnist1d``:
merge_quality_mnist1d.md / .json). mnist1d (Greydanus) is generated procedurally by the
``mnist1d`` package's own generator (``make_dataset`` with its default arguments, seed 42: 4000
train / 1000 test signals of length 40, no download); the conv models then use their 1-D
variants (`digits_models`). Per model: endpoint
accuracies, the ensemble (averaged logits), and per method x normalization the midpoint
accuracy, the accuracy barrier (Vanishing Feature paper, Fig. 6 caption) and the loss barrier
(Distill-and-Merge, Eq. 1) over alpha in {0, .25, .5, .75, 1}, plus matching time.
Sinkhorn / STE use ``--steps`` steps (default: the library's defaults) with cross-entropy on the
training batches as ``loss_fn``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import autoperm  # noqa: E402
from digits_models import MODELS  # noqa: E402

ALPHAS = [0.0, 0.25, 0.5, 0.75, 1.0]
METHODS = ("identity", "weight", "activation", "sinkhorn", "sinkhorn_loss", "ste")
# on request: activation matching on all sites (features="all"); the same with the statistics also
# taken over the training inputs shifted by one pixel (sample) each way along each spatial dim
# weight_heads / activation_heads: the same matchers on a hierarchical spec (trace(hierarchical=True):
# one head_dim permutation per attention head; identical to weight / activation on models without heads)
EXTRA_METHODS = ("activation_all", "activation_shift", "weight_heads", "activation_heads")


def digits(seed=0):
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(d.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    return (x[perm[:1400]], y[perm[:1400]]), (x[perm[1400:]], y[perm[1400:]])


def mnist1d_data():
    """mnist1d generated offline by its package (default arguments, seed 42), as ``(N, 1, 40)``."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    d = make_dataset(args)
    as_x = lambda a: torch.tensor(a, dtype=torch.float32).unsqueeze(1)  # noqa: E731
    return (as_x(d["x"]), torch.tensor(d["y"])), (as_x(d["x_test"]), torch.tensor(d["y_test"]))


DATASETS = {"digits": digits, "mnist1d": mnist1d_data}


def train(factory, x, y, seed, epochs, lr=0.1):
    torch.manual_seed(seed)
    model = factory()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=epochs * ((len(x) + 63) // 64))
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(64):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            sched.step()
    return model.eval()


@torch.no_grad()
def evaluate(model, x, y):
    logits = model(x)
    return {"acc": (logits.argmax(1) == y).float().mean().item(), "loss": F.cross_entropy(logits, y).item()}


def split_halves(x, y, seed):
    """Class-biased halves: A sees 80% of classes 0-4 and 20% of 5-9, B the reverse."""
    g = torch.Generator().manual_seed(seed)
    low = y < 5
    keep_a = torch.where(low, torch.rand(len(y), generator=g) < 0.8, torch.rand(len(y), generator=g) < 0.2)
    return (x[keep_a], y[keep_a]), (x[~keep_a], y[~keep_a])


def shifted(batches):
    """Copies of the input batches rolled by one pixel (sample) each way along each spatial dim:
    more varied unlabeled inputs for activation statistics (normalization still uses the plain set)."""
    return [torch.roll(x, s, d) for x in batches for d in range(2, x.dim()) for s in (-1, 1)]


def match_options(method, data, data_xy, steps):
    """``autoperm.match`` keyword arguments for one benchmark method."""
    if method.endswith("_heads"):
        return match_options(method[:-len("_heads")], data, data_xy, steps)
    if method == "sinkhorn":
        return dict(method="sinkhorn", steps=steps)
    if method in ("sinkhorn_loss", "ste"):
        return dict(method=method.split("_")[0], data=data_xy, loss_fn=F.cross_entropy, steps=steps)
    if method == "activation_all":
        return dict(method="activation", data=data, features="all")
    if method == "activation_shift":
        return dict(method="activation", data=data + shifted(data), features="all")
    return dict(method=method, data=data)


def run_model(name, epochs, train_set, test_set, methods=METHODS, steps=None, lr=0.1):
    factory, split = MODELS[name]
    (xtr, ytr), (xte, yte) = train_set, test_set
    if split:
        (xa, ya), (xb, yb) = split_halves(xtr, ytr, 0)
    else:
        (xa, ya), (xb, yb) = (xtr, ytr), (xtr, ytr)
    t0 = time.perf_counter()
    shape = tuple(xtr.shape[1:])
    make = lambda: factory(shape)  # noqa: E731
    a, b = train(make, xa, ya, 1, epochs, lr), train(make, xb, yb, 2, epochs, lr)
    train_s = time.perf_counter() - t0
    data = list(xtr.split(256))
    data_xy = list(zip(xtr.split(256), ytr.split(256)))
    ev = lambda m: evaluate(m, xte, yte)  # noqa: E731
    with torch.no_grad():
        ens_logits = (a(xte) + b(xte)) / 2
    row = {"params": sum(p.numel() for p in a.parameters()), "train_s": train_s, "lr": lr,
           "acc_a": ev(a)["acc"], "acc_b": ev(b)["acc"],
           "ensemble": (ens_logits.argmax(1) == yte).float().mean().item(), "merges": {}}
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in a.modules())
    norms = [None] + (["reset"] if has_bn else []) + ["repair", "rescale", "regression"]
    spec = autoperm.trace(a, xte[:4])
    spec_heads = autoperm.trace(a, xte[:4], hierarchical=True) \
        if any(m.partition("@")[0].endswith("_heads") for m in methods) else None
    for method in methods:
        base, _, budget = method.partition("@")  # "ste_heads@1600": that method with 1600 steps
        al = autoperm.match(a, b, spec_heads if base.endswith("_heads") else spec,
                            **match_options(base, data, data_xy, int(budget) if budget else steps))
        for norm in norms:
            curve = autoperm.interpolate(a, b, ALPHAS, ev, method=al.method, alignment=al, normalize=norm,
                                         data=data if norm else None)
            row["merges"][f"{method}/{norm or 'none'}"] = {
                "mid_acc": curve.values[2]["acc"], "acc_barrier": curve.accuracy_barrier("acc"),
                "loss_barrier": curve.loss_barrier("loss"), "match_s": al.seconds}
            print(f"{name} {method}/{norm}: mid {curve.values[2]['acc']:.3f} "
                  f"barrier {curve.accuracy_barrier('acc'):.3f}", file=sys.stderr, flush=True)
    return row


def append_rows(old, new):
    """``old`` updated by ``new``; a model already in ``old`` with the same endpoint accuracies
    (the same deterministic training) keeps its other methods' rows and gains the new ones."""
    out = dict(old)
    for name, row in new.items():
        prev = old.get(name)
        if prev and (prev["acc_a"], prev["acc_b"]) == (row["acc_a"], row["acc_b"]):
            row = {**row, "merges": {**prev["merges"], **row["merges"]}}
        out[name] = row
    return out


NORM_ORDER = ("none", "reset", "repair", "rescale", "regression")


def _ordered(merges: dict) -> list:
    """Rows grouped by method (in the order methods first appear), normalizations in NORM_ORDER:
    rows added by a later ``--append`` run sit with their method."""
    methods = list(dict.fromkeys(k.rsplit("/", 1)[0] for k in merges))
    rank = lambda k: (methods.index(k.rsplit("/", 1)[0]),  # noqa: E731
                      NORM_ORDER.index(k.rsplit("/", 1)[1]) if k.rsplit("/", 1)[1] in NORM_ORDER else len(NORM_ORDER))
    return sorted(merges.items(), key=lambda kv: rank(kv[0]))


def render(rows, args):
    if args.dataset == "digits":
        title, cmd, what = "digits", "", "scikit-learn digits, 1400 train / 397 test"
    else:
        title, cmd = "mnist1d", " --dataset mnist1d --append --models MODEL [--methods M] [--lr LR]"
        what = ("mnist1d generated offline by its package (default arguments, seed 42; 4000 train / 1000 test "
                "signals of length 40; conv models in their 1-D variants)")
    if getattr(args, "tag", None):
        cmd = f" --models {args.models} --methods {args.methods} --tag {args.tag}" + \
            ("" if args.dataset == "digits" else f" --dataset {args.dataset}")
    lines = [f"# merge quality on {title}" + (f" ({args.tag})" if getattr(args, "tag", None) else ""), "",
             f"`python benchmarks/merge_quality.py{cmd} --epochs {args.epochs}` ({what}, pairs trained from seeds 1 and 2; alpha is the weight of model B; barriers are maxima "
             "over alpha in {0, .25, .5, .75, 1}; accuracies in %). Normalizations: RESET / REPAIR / RESCALE (the papers') "
             "and regression (autoperm's: each conv / linear layer refit by ridge regression to the interpolation of "
             "the endpoints' outputs on the training inputs; rows added later by `--append` where listed). "
             "sinkhorn: weight-distance objective; "
             "sinkhorn_loss and ste: midpoint cross-entropy on the training batches; activation_all (where run): "
             "activation matching on all sites (`features=\"all\"`: residual sums and normalized values too); "
             "activation_shift (where run): the same with its statistics taken over the training inputs and their "
             "copies rolled by one pixel (sample) each way along each spatial dim (REPAIR / RESET data unchanged); "
             "METHOD_heads (where run): METHOD on the spec traced with `hierarchical=True`, so that weight and "
             "activation matching refine each attention head's head_dim permutation on its own (STE: in every "
             "projection); METHOD@N: that method with a budget of N steps instead of the library's default"
             f"{'' if args.steps is None else f', {args.steps} steps'}. With `--append`, rows come from separate runs "
             "(`--models` / `--methods` subsets, same epochs and seeds): each table lists the methods run for "
             "that model.", ""]
    for name, r in rows.items():
        ends = (r["acc_a"] + r["acc_b"]) / 2
        lr = r.get("lr", 0.1)
        lines += [f"## {name} ({r['params'] / 1e3:.0f}k parameters{'' if lr == 0.1 else f'; trained with --lr {lr}'})", "",
                  f"endpoints {100 * r['acc_a']:.1f} / {100 * r['acc_b']:.1f} (mean {100 * ends:.1f}); "
                  f"ensemble {100 * r['ensemble']:.1f}", "",
                  "| method / normalization | midpoint acc | acc barrier | loss barrier | match s |",
                  "| --- | ---: | ---: | ---: | ---: |"]
        for key, m in _ordered(r["merges"]):
            lines.append(f"| {key} | {100 * m['mid_acc']:.1f} | {100 * m['acc_barrier']:.1f} | "
                         f"{m['loss_barrier']:.3f} | {m['match_s']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", choices=sorted(DATASETS), default="digits")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--lr", type=float, default=0.1, help="OneCycle peak learning rate of the training")
    ap.add_argument("--steps", type=int, default=None, help="Sinkhorn / STE step budget (default: library's)")
    ap.add_argument("--append", action="store_true",
                    help="keep the other models' rows already in OUT/merge_quality[_DATASET].json (runs of separate "
                         "models, e.g. in parallel processes, add up)")
    ap.add_argument("--tag", default=None,
                    help="write OUT/merge_quality[_DATASET]_TAG.md / .json instead (a separate run: another "
                         "machine's training differs in the last bits, so its rows are not mixed with the main file's)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    train_set, test_set = DATASETS[args.dataset]()
    stem = "merge_quality" if args.dataset == "digits" else f"merge_quality_{args.dataset}"
    stem += f"_{args.tag}" if args.tag else ""
    rows = {}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.models.split(","):
        rows[name] = run_model(name, args.epochs, train_set, test_set, args.methods.split(","), args.steps,
                               args.lr)
        path = out / f"{stem}.json"
        if args.append and path.exists():  # re-read: another process may have added rows meanwhile
            rows = append_rows(json.loads(path.read_text()), rows)
        path.write_text(json.dumps(rows, indent=1))
        (out / f"{stem}.md").write_text(render(rows, args))
    print(render(rows, args))


if __name__ == "__main__":
    main()

"""Preserve-First Merging on digits, in the layout of Table 1 of the Vanishing Feature paper
(../papers/003, section 4.4): rows PFM_{l/L}, columns the midpoint accuracy without normalization,
with RESET (BatchNorm models), REPAIR, RESCALE and bias calibration (Table 1's "Bias Cal.") of the
merged layers only, autoperm's regression, and the parameter / FLOP multipliers against one model.

Usage: python benchmarks/pfm.py [--models vgg,resnet20x1] [--epochs 30] [--method activation] [--pairs N]
Pairs are trained as in benchmarks/merge_quality.py (seeds 1 and 2), aligned by activation
matching (as the paper's Table 1; ``--method activation_shift``: statistics on all sites over the
training inputs and their one-pixel shifts, as merge_quality.py's row of that name), merged at
alpha = 0.5. Writes benchmarks/results/pfm.md / .json (pfm_METHOD.md / .json for another method).
``--pairs N`` trains N pairs (seeds 1 and 2, 3 and 4, ...) and writes pfm[_METHOD]_pairsN.md / .json
with the mean and standard deviation over the pairs of every accuracy, as the paper's Table 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import autoperm  # noqa: E402
from autoperm.frontend import capture  # noqa: E402
from autoperm.rewrite import flop_count, param_count  # noqa: E402
from autoperm.rewrite.pfm import counted_layers  # noqa: E402
from digits_models import MODELS  # noqa: E402
from merge_quality import digits, evaluate, match_options, train  # noqa: E402

ROWS = {"vgg": None, "resnet20x1": [0, 3, 6, 9, 13, 16, 19, 20]}
NEEDS_DATA = ("reset", "repair", "rescale", "regression")


def run_model(name, epochs, train_set, test_set, method="activation", seeds=(1, 2)):
    factory, _ = MODELS[name]
    (xtr, ytr), (xte, yte) = train_set, test_set
    t0 = time.perf_counter()
    a, b = train(factory, xtr, ytr, seeds[0], epochs), train(factory, xtr, ytr, seeds[1], epochs)
    train_s = time.perf_counter() - t0
    data = list(xtr.split(256))
    with torch.no_grad():
        ens = ((a(xte) + b(xte)) / 2).argmax(1).eq(yte).float().mean().item()
    al = autoperm.match(a, b, example_inputs=xte[:4], **match_options(method, data, None, None))
    L = len(counted_layers(al.traced or capture(a, xte[:4])))
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in a.modules())
    norms = [None] + (["reset"] if has_bn else []) + ["repair", "rescale", "bias_calibration", "regression"]
    base_params, base_flops = param_count(a), flop_count(a, xte[:1])
    row = {"L": L, "params": base_params, "flops": base_flops, "train_s": train_s,
           "acc_a": evaluate(a, xte, yte)["acc"], "acc_b": evaluate(b, xte, yte)["acc"], "ensemble": ens,
           "pfm": {}}
    for l in ROWS.get(name) or list(range(L + 1)):
        cell = {}
        for norm in norms:
            t1 = time.perf_counter()
            m = autoperm.merge(a, b, alignment=al, preserve_first=l, normalize=norm,
                               data=data if norm in NEEDS_DATA else None, example_inputs=xte[:4]) if l else \
                autoperm.merge(a, b, alignment=al, normalize=norm, data=data if norm in NEEDS_DATA else None)
            cell[norm or "none"] = evaluate(m, xte, yte)["acc"]
            cell["param_x"] = param_count(m) / base_params
            cell["flop_x"] = flop_count(m, xte[:1]) / base_flops
            print(f"{name} l={l}/{L} {norm}: {cell[norm or 'none']:.3f} params x{cell['param_x']:.2f} "
                  f"({time.perf_counter() - t1:.1f}s)", file=sys.stderr, flush=True)
        row["pfm"][str(l)] = cell
    return row


PAPER_NORMS = ("none", "reset", "repair", "rescale", "bias_calibration")  # Table 1's; "regression" is autoperm's


def _table(r, norms, ends, value, text):
    """The PFM table's lines, and per kind of normalization ("paper": none / reset / repair /
    rescale / bias_calibration; "regression") the first row within 1.3x parameters whose ``value`` (an accuracy)
    reaches ``ends``: (l, cell, normalizations), or None."""
    lines = ["| PFM | " + " | ".join(f"mid acc ({n})" for n in norms) + " | params | FLOPs |",
             "| --- | " + " | ".join("---:" for _ in norms) + " | ---: | ---: |"]
    best = {"paper": None, "regression": None}
    for l, c in r["pfm"].items():
        accs = " | ".join(text(c[n]) + (" *" if value(c[n]) >= ends else "") for n in norms)
        lines.append(f"| PFM {l}/{r['L']} | {accs} | {c['param_x']:.2f}x | {c['flop_x']:.2f}x |")
        for kind in best:
            hit = [n for n in norms if value(c[n]) >= ends and (n in PAPER_NORMS) == (kind == "paper")]
            if best[kind] is None and c["param_x"] <= 1.3 and hit:
                best[kind] = (l, c, hit)
    return lines, best


def _verdict(best, L, on="") -> str:
    """The target's line: met or not with the paper's normalizations, and with regression."""
    out = []
    for kind, label in (("paper", "with the paper's normalizations (none / reset / repair / rescale / "
                                  "bias_calibration)"),
                        ("regression", "with autoperm's regression normalization (not in the paper)")):
        b = best[kind]
        out.append(f"{label}: " + (f"met from PFM {b[0]}/{L} with {b[1]['param_x']:.2f}x parameters "
                                   f"({', '.join(b[2])})" if b else "not met"))
    tail = " (the full merge, PFM 0, already reaches it there: that is the normalization, not PFM)" \
        if best["regression"] and best["regression"][0] in ("0", 0) else ""
    return f"Target (<= 1.3x parameters, {on}>= the endpoints' mean) " + "; ".join(out) + tail + "."


def render(rows, args):
    lines = ["# Preserve-First Merging on digits", "",
             f"`python benchmarks/pfm.py --epochs {args.epochs}"
             + (f" --method {args.method}" if args.method != "activation" else "")
             + "` (torch.set_num_threads(1); scikit-learn digits, 1400 train / 397 test; pairs from seeds 1 "
             f"and 2; aligned by `{args.method}` (merge_quality.py's method of that name); alpha = 0.5). "
             "PFM_{l/L}: the first l of L counted layers (conv / linear in topological order, shortcut "
             "projections excluded) are kept unmerged; l = 0 is the full merge, l = L the ensemble. "
             "Accuracies in %; multipliers against one model (FLOPs counted by FlopCounterMode, batch 1). "
             "Normalizations act on the merged layers only, measured on the training set: reset (merged "
             "BatchNorms recomputed), repair / rescale (each merged conv / linear layer's per-channel "
             "pre-activation mean and std / std only set to the endpoints' interpolation, folded into its "
             "weights; a merged layer feeding a BatchNorm is left alone and that BatchNorm gets the exact "
             "statistics instead, so on ResNet20 repair and rescale both amount to a BatchNorm reset with "
             "population variances), bias_calibration (Table 1's Bias Cal., section 4.3, no data: a merged "
             "layer's bias at merge depth d becomes (1 - alpha)^d b_A + alpha^d b_B, the merge node counting "
             "as one step, so the first merged layer has d = 2; on ResNet20 only the classifier has a bias), "
             "regression (autoperm's, not in the paper: each merged conv / linear "
             "layer refit by ridge regression, ridge 1e-2, so that its output on the PFM module's own inputs "
             "matches the interpolation of the endpoints' outputs; through its BatchNorm where it feeds one).", ""]
    for name, r in rows.items():
        ends = (r["acc_a"] + r["acc_b"]) / 2
        norms = [k for k in next(iter(r["pfm"].values())) if k not in ("param_x", "flop_x")]
        lines += [f"## {name} ({r['params'] / 1e3:.0f}k parameters, L = {r['L']})", "",
                  f"endpoints {100 * r['acc_a']:.1f} / {100 * r['acc_b']:.1f} (mean {100 * ends:.1f}); "
                  f"ensemble {100 * r['ensemble']:.1f}", ""]
        table, best = _table(r, norms, ends, lambda v: v, lambda v: f"{100 * v:.1f}")
        lines += table + ["", "`*`: at or above the endpoints' mean. " + _verdict(best, r["L"]), ""]
    return "\n".join(lines)


def summarize(runs: list[dict]) -> dict:
    """Per-cell mean and standard deviation over pairs (rows of `run_model`, same model)."""
    def ms(values):
        t = torch.tensor(values, dtype=torch.float64)
        return {"mean": float(t.mean()), "std": float(t.std()) if len(values) > 1 else 0.0}

    first = runs[0]
    out = {"L": first["L"], "params": first["params"], "pairs": len(runs),
           "ends": ms([(r["acc_a"] + r["acc_b"]) / 2 for r in runs]), "ensemble": ms([r["ensemble"] for r in runs]),
           "pfm": {}}
    for l, c in first["pfm"].items():
        out["pfm"][l] = {k: (v if k in ("param_x", "flop_x") else ms([r["pfm"][l][k] for r in runs]))
                         for k, v in c.items()}
    return out


def render_pairs(rows, args) -> str:
    lines = ["# Preserve-First Merging on digits, mean over pairs", "",
             f"`python benchmarks/pfm.py --epochs {args.epochs} --models {args.models} --pairs {args.pairs}"
             + (f" --method {args.method}" if args.method != "activation" else "")
             + f"`: as `pfm.md`, for {args.pairs} pairs (seeds 1 and 2, 3 and 4, ...); every accuracy is the mean "
             "+- standard deviation over the pairs (the paper's Table 1 reports the same). `*`: the mean is at "
             "or above the mean of the endpoints' means.", ""]
    for name, r in rows.items():
        ends = r["ends"]["mean"]
        norms = [k for k in next(iter(r["pfm"].values())) if k not in ("param_x", "flop_x")]
        lines += [f"## {name} (L = {r['L']}, {r['pairs']} pairs)", "",
                  f"endpoints' mean {100 * ends:.1f} +- {100 * r['ends']['std']:.1f}; ensemble "
                  f"{100 * r['ensemble']['mean']:.1f} +- {100 * r['ensemble']['std']:.1f}", ""]
        table, best = _table(r, norms, ends, lambda v: v["mean"],
                             lambda v: f"{100 * v['mean']:.1f} +- {100 * v['std']:.1f}")
        lines += table + ["", _verdict(best, r["L"], on="mean "), ""]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="vgg,resnet20x1")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--method", default="activation", choices=["activation", "activation_shift", "weight"],
                    help="how the pair is aligned (merge_quality.py's methods of those names)")
    ap.add_argument("--pairs", type=int, default=1, help="pairs to train and average over (seeds 1-2, 3-4, ...)")
    args = ap.parse_args()
    if args.pairs < 1:
        ap.error(f"--pairs {args.pairs}: pass at least 1")
    stem = "pfm" if args.method == "activation" else f"pfm_{args.method}"
    torch.set_num_threads(1)
    train_set, test_set = digits()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = {}
    if args.pairs > 1:
        stem += f"_pairs{args.pairs}"
        for name in args.models.split(","):
            runs = [run_model(name, args.epochs, train_set, test_set, args.method, (2 * k + 1, 2 * k + 2))
                    for k in range(args.pairs)]
            rows[name] = {**summarize(runs), "runs": runs}
            (out / f"{stem}.json").write_text(json.dumps(rows, indent=1))
            (out / f"{stem}.md").write_text(render_pairs(rows, args))
        print(render_pairs(rows, args))
        return
    for name in args.models.split(","):
        rows[name] = run_model(name, args.epochs, train_set, test_set, args.method)
        (out / f"{stem}.json").write_text(json.dumps(rows, indent=1))
        (out / f"{stem}.md").write_text(render(rows, args))
    print(render(rows, args))


if __name__ == "__main__":
    main()

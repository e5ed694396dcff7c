"""Partial merging on scikit-learn's digits: accuracy-barrier reduction against added parameters
(the Partial Model Merging thesis, ../papers/004, Figures 4.12-4.15 and 4.27-4.30).

Usage: python benchmarks/partial.py [--models mlp128,vgg] [--epochs 30] [--norms none,repair[,regression]]
Writes benchmarks/results/partial.png, partial.md and partial.json (``--pairs N``: N pairs, seeds 1
and 2, 3 and 4, ..., averaged into partial_pairsN.png / .md / .json). Per model pair (trained as in
benchmarks/merge_quality.py, aligned by activation matching) and with / without REPAIR (``--norms``: also autoperm's
``regression``, which is not in the thesis):

* forced: every group widened by gamma in {0, .1, .2, .3, .5, .7, 1};
* adaptive: thresholds epsilon in {.1, .2, .3, .4, .5, .6, .8} (at most gamma = 1);
* benefit-ordered (thesis section 4.8): each group widened alone, benefit factor = accuracy gain
  (on 400 training samples, no test data) / added parameters; then
  `autoperm.rewrite.partial.benefit_order` for budgets of +5% .. +100% parameters (groups
  switched to gamma = 1 in that order, the remainder given to the next group);
* greedy (the thesis's proposed improvement, chapter 5): `autoperm.rewrite.partial.benefit_greedy`,
  steps of gamma 0.25, each round keeping the step with the best gain of minus the cross-entropy
  on the same 400 training samples per added parameter, up to +50% (``--greedy-budget``); one
  point per accepted step.

The barrier is the midpoint's (alpha = 0.5) accuracy barrier, mean endpoint accuracy minus the
merged accuracy, on the 397 test samples; reduction is relative to
the full merge with the same normalization. Parameters count every stored element (the widened
tensors' zero blocks included), relative to one endpoint.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import autoperm  # noqa: E402
from autoperm.rewrite.partial import benefit_factors, benefit_greedy, benefit_order, partial_widen  # noqa: E402
from digits_models import MODELS  # noqa: E402
from merge_quality import digits, evaluate, train  # noqa: E402

GAMMAS = [0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0]
EPSILONS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8]
BUDGETS = [0.05, 0.1, 0.2, 0.3, 0.5, 1.0]


def run_model(name: str, epochs: int, train_set, test_set, stats_n: int, greedy_budget: float = 0.5,
              seeds: tuple[int, int] = (1, 2), norms: tuple[str | None, ...] = (None, "repair")) -> dict:
    factory, _ = MODELS[name]
    (xtr, ytr), (xte, yte) = train_set, test_set
    xva, yva = xtr[-400:], ytr[-400:]
    t0 = time.perf_counter()
    a, b = train(factory, xtr, ytr, seeds[0], epochs), train(factory, xtr, ytr, seeds[1], epochs)
    data = list(xtr[:stats_n].split(128))
    al = autoperm.match(a, b, method="activation", data=data)
    acc = lambda m, x, y: evaluate(m, x, y)["acc"]  # noqa: E731
    ends = (acc(a, xte, yte) + acc(b, xte, yte)) / 2
    with torch.no_grad():
        ens = ((a(xte) + b(xte)) / 2).argmax(1).eq(yte).float().mean().item()
    row = {"params": sum(p.numel() for p in a.parameters()), "endpoints": ends, "ensemble": ens,
           "acc_a": acc(a, xte, yte), "acc_b": acc(b, xte, yte), "curves": {}}

    def point(norm, **kw) -> dict:
        r = partial_widen(a, b, al, alpha=0.5, normalize=norm, data=data, **kw)
        return {"added": r.added, "added_nonzero": r.nonzero / r.params_base - 1, "acc": acc(r.module, xte, yte),
                "widths": {g: w for g, (n, w) in r.widths.items()}}

    for norm in norms:
        tag = norm or "none"
        curves = {"forced": [dict(point(norm, partial=g), gamma=g) for g in GAMMAS]}
        curves["adaptive"] = [dict(point(norm, partial=1.0, assignment="adaptive", threshold=e), epsilon=e)
                              for e in EPSILONS]
        factors = benefit_factors(a, b, al, data, lambda m: acc(m, xva, yva), alpha=0.5, normalize=norm)
        order = sorted(factors, key=lambda g: -factors[g].factor)
        bo = [dict(curves["forced"][0], budget=0.0, gammas={})]
        for budget in BUDGETS:
            gammas = benefit_order(a, b, al, data, None, budget=budget, factors=factors)
            bo.append(dict(point(norm, partial=gammas) if gammas else curves["forced"][0], budget=budget,
                           gammas=gammas))
        curves["benefit"] = bo
        t1 = time.perf_counter()
        with torch.no_grad():
            run = benefit_greedy(a, b, al, data, lambda m: -evaluate(m, xva, yva)["loss"], budget=greedy_budget,
                                 step=0.25, alpha=0.5, normalize=norm)
        curves["greedy"] = [dict(point(norm, partial=st.gammas) if st.gammas else curves["forced"][0],
                                 gammas=st.gammas, score=st.score) for st in run.path]
        # the same search read at the benefit order's budgets (points that line up across pairs)
        curves["greedy_at"] = [dict(point(norm, partial=run.at(bgt)) if run.at(bgt) else curves["forced"][0],
                                    budget=bgt, gammas=run.at(bgt)) for bgt in BUDGETS if bgt <= greedy_budget]
        row.setdefault("greedy_s", {})[tag] = time.perf_counter() - t1
        row.setdefault("greedy_evaluations", {})[tag] = run.evaluations
        full = curves["forced"][0]["acc"]
        for pts in curves.values():
            for p in pts:
                barrier = ends - p["acc"]
                p["barrier"] = barrier
                p["reduction"] = 1 - barrier / (ends - full) if ends - full > 1e-9 else float("nan")
        row["curves"][tag] = {"full_acc": full, "factors": {g: vars(f) for g, f in factors.items()}, **curves}
        print(f"{name}/{tag}: endpoints {ends:.3f} ensemble {ens:.3f} full {full:.3f}; benefit order {order}",
              file=sys.stderr, flush=True)
    row["seconds"] = time.perf_counter() - t0
    return row


def _mean(v):
    """A point's value: the mean over pairs in a pair summary (`summarize`), else the value."""
    return v["mean"] if isinstance(v, dict) else v


def removed_within(points: list[dict], limit: float = 0.30) -> float | None:
    """Smallest parameter increase at which the barrier is gone (<= 0), if within ``limit``; on
    pair summaries (`summarize`) the mean barrier and the mean increase."""
    ok = [_mean(p["added"]) for p in points if _mean(p["barrier"]) <= 0 and _mean(p["added"]) <= limit + 1e-9]
    return min(ok) if ok else None


def _norms_arg(args) -> str:
    return "" if args.norms == "none,repair" else f" --norms {args.norms}"


REGRESSION_NOTE = ("Normalization `regression` is autoperm's (`normalize=\"regression\"`: every conv / linear layer of "
                   "the widened model refit by ridge regression to the interpolated output of a matched unit and "
                   "its own model's output for an unmatched one); it is not in the thesis, and the target names "
                   "REPAIR.")


def render(rows: dict, args) -> str:
    lines = ["# partial merging on digits", "",
             f"`python benchmarks/partial.py --models {','.join(rows)} --epochs {args.epochs}{_norms_arg(args)}` "
             "(scikit-learn digits: "
             "1400 train / 397 test; pairs trained from seeds 1 and 2 as in merge_quality.py; "
             "activation matching; alpha = 0.5; accuracies in %; added = stored parameters relative to one "
             "endpoint; reduction = share of the full merge's accuracy barrier removed). Target: benefit-ordered "
             "partial merging after REPAIR removes the barrier with at most +30% parameters."
             + (" " + REGRESSION_NOTE if "regression" in args.norms else ""), ""]
    for name, r in rows.items():
        lines += [f"## {name} ({r['params'] / 1e3:.0f}k parameters)", "",
                  f"endpoints {100 * r['acc_a']:.1f} / {100 * r['acc_b']:.1f} (mean {100 * r['endpoints']:.1f}); "
                  f"ensemble {100 * r['ensemble']:.1f}", ""]
        for tag, c in r["curves"].items():
            hit = removed_within(c["benefit"])
            g_hit = removed_within(c["greedy"]) if "greedy" in c else None
            lines += [f"### normalization: {tag} (full merge {100 * c['full_acc']:.1f}; benefit-ordered removes the "
                      f"barrier within +30%: {'yes, at +%.0f%%' % (100 * hit) if hit is not None else 'no'}"
                      + (f"; greedy: {'yes, at +%.0f%%' % (100 * g_hit) if g_hit is not None else 'no'}"
                         if "greedy" in c else "") + ")", "",
                      "| strategy | setting | added params | added non-zero | acc | barrier | reduction |",
                      "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
            for strat in ("forced", "adaptive", "benefit", "greedy"):
                for p in c.get(strat, []):
                    groups = ", ".join(f"{g}:{v:g}" for g, v in p.get("gammas", {}).items()) or "none"
                    setting = (f"gamma {p['gamma']}" if strat == "forced" else f"eps {p['epsilon']}"
                               if strat == "adaptive" else f"budget +{100 * p['budget']:.0f}%: {groups}"
                               if strat == "benefit" else f"step: {groups}")
                    lines.append(f"| {strat} | {setting} | {100 * p['added']:+.0f}% | "
                                 f"{100 * p['added_nonzero']:+.0f}% | {100 * p['acc']:.1f} | "
                                 f"{100 * p['barrier']:.1f} | {100 * p['reduction']:.0f}% |")
            order = sorted(c["factors"].items(), key=lambda kv: -kv[1]["factor"])
            lines += ["", "benefit factors (training-subset accuracy gain / added parameters, group alone at gamma 1): "
                      + ", ".join(f"`{g}` {v['gain'] * 100:+.1f} pts / {v['params']}" for g, v in order), ""]
    return "\n".join(lines)


PAIR_STRATEGIES = ("forced", "adaptive", "benefit", "greedy_at")
TITLES = {"none": "no normalization", "repair": "after REPAIR", "regression": "after regression (autoperm's)"}


def _ms(values) -> dict:
    t = torch.tensor(values, dtype=torch.float64)
    return {"mean": float(t.mean()), "std": float(t.std()) if len(values) > 1 else 0.0}


def _setting(strat: str, p: dict) -> str:
    return (f"gamma {p['gamma']}" if strat == "forced" else f"eps {p['epsilon']}" if strat == "adaptive"
            else f"budget +{100 * p['budget']:.0f}%")


def summarize(runs: list[dict]) -> dict:
    """Mean and standard deviation over pairs (rows of `run_model`, same model) of every point
    that lines up across pairs: forced gammas, adaptive thresholds, and the benefit order and
    greedy search at each budget (the groups they pick may differ per pair)."""
    out = {"params": runs[0]["params"], "pairs": len(runs), "ends": _ms([r["endpoints"] for r in runs]),
           "ensemble": _ms([r["ensemble"] for r in runs]), "curves": {}}
    for tag in runs[0]["curves"]:
        cs = [r["curves"][tag] for r in runs]
        full = _ms([c["full_acc"] for c in cs])
        barrier0 = out["ends"]["mean"] - full["mean"]
        cur = {"full_acc": full}
        for strat in PAIR_STRATEGIES:
            pts = []
            for i, p in enumerate(cs[0].get(strat, [])):
                each = [c[strat][i] for c in cs]
                barrier = _ms([r["endpoints"] - q["acc"] for r, q in zip(runs, each)])
                pts.append({"setting": _setting(strat, p), "added": _ms([q["added"] for q in each]),
                            "acc": _ms([q["acc"] for q in each]), "barrier": barrier,
                            "reduction": 1 - barrier["mean"] / barrier0 if barrier0 > 1e-9 else float("nan")})
            cur[strat] = pts
        out["curves"][tag] = cur
    return out


def render_pairs(rows: dict, args) -> str:
    pct = lambda v: f"{100 * v['mean']:.1f} +- {100 * v['std']:.1f}"  # noqa: E731
    lines = ["# partial merging on digits, mean over pairs", "",
             f"`python benchmarks/partial.py --models {','.join(rows)} --epochs {args.epochs} --pairs {args.pairs}"
             f"{_norms_arg(args)}`: "
             f"as `partial.md`, for {args.pairs} pairs (seeds 1 and 2, 3 and 4, ...); accuracies and barriers are "
             "the mean +- standard deviation over the pairs, added parameters the mean; reduction = share of the "
             "full merge's mean barrier removed. The greedy search is read at the benefit order's budgets "
             "(`Greedy.at`). Target: benefit-ordered partial merging after REPAIR removes the barrier (mean "
             "barrier <= 0) with at most +30% parameters." + (" " + REGRESSION_NOTE if "regression" in args.norms else ""),
             ""]
    for name, r in rows.items():
        lines += [f"## {name} ({r['params'] / 1e3:.0f}k parameters, {r['pairs']} pairs)", "",
                  f"endpoints' mean {pct(r['ends'])}; ensemble {pct(r['ensemble'])}", ""]
        for tag, c in r["curves"].items():
            verdict = []
            for strat, label in (("benefit", "benefit-ordered"), ("greedy_at", "greedy")):
                hit = removed_within(c[strat])
                verdict.append(f"{label} removes the mean barrier within +30%: "
                               + (f"yes, at +{100 * hit:.0f}%" if hit is not None else "no"))
            lines += [f"### normalization: {tag} (full merge {pct(c['full_acc'])}; {'; '.join(verdict)})", "",
                      "| strategy | setting | added params | acc | barrier | reduction |",
                      "| --- | --- | ---: | ---: | ---: | ---: |"]
            for strat in PAIR_STRATEGIES:
                for p in c[strat]:
                    lines.append(f"| {strat.replace('_at', '')} | {p['setting']} | {100 * p['added']['mean']:+.0f}% | "
                                 f"{pct(p['acc'])} | {pct(p['barrier'])} | {100 * p['reduction']:.0f}% |")
            lines.append("")
    return "\n".join(lines)


def plot(rows: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tags = list(next(iter(rows.values()))["curves"])
    fig, axes = plt.subplots(len(rows), len(tags), figsize=(5 * len(tags), 3.6 * len(rows)), squeeze=False)
    for i, (name, r) in enumerate(rows.items()):
        for j, tag in enumerate(tags):
            ax = axes[i][j]
            c = r["curves"][tag]
            greedy = "greedy_at" if "pairs" in r else "greedy"
            for strat, style in (("forced", "o-"), ("adaptive", "s--"), ("benefit", "^-"), (greedy, "v-.")):
                if strat not in c:
                    continue
                pts = sorted(c[strat], key=lambda p: _mean(p["added"]))
                ax.plot([100 * _mean(p["added"]) for p in pts], [100 * p["reduction"] for p in pts], style,
                        label=strat.replace("_at", ""))
            ax.axhline(100, color="grey", lw=0.8, ls=":")
            ax.axvline(30, color="red", lw=0.8, ls=":")
            ax.set_title(f"{name}, {TITLES.get(tag, tag)}"
                         + (f" (mean of {r['pairs']} pairs)" if "pairs" in r else ""))
            ax.set_xlabel("added parameters (%)")
            ax.set_ylabel("accuracy barrier reduction (%)")
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mlp128,vgg")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--stats", type=int, default=512, help="training samples used for statistics / REPAIR")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--append", action="store_true", help="keep the models already in partial.json")
    ap.add_argument("--greedy-budget", type=float, default=0.5, help="parameter budget of the greedy search")
    ap.add_argument("--norms", default="none,repair",
                    help="normalizations, comma-separated: none, repair (the target's), regression (autoperm's, "
                         "not in the thesis), reset, rescale")
    ap.add_argument("--pairs", type=int, default=1,
                    help="pairs to train and average over (seeds 1-2, 3-4, ...); writes partial_pairsN.*")
    args = ap.parse_args()
    if args.pairs < 1:
        ap.error(f"--pairs {args.pairs}: pass at least 1")
    norms = tuple(None if n == "none" else n for n in args.norms.split(","))
    torch.set_num_threads(1)
    train_set, test_set = digits()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.pairs > 1:
        stem = f"partial_pairs{args.pairs}"
        rows = json.loads((out / f"{stem}.json").read_text()) if args.append and (out / f"{stem}.json").exists() else {}
        for name in args.models.split(","):
            runs = [run_model(name, args.epochs, train_set, test_set, args.stats, args.greedy_budget,
                              (2 * k + 1, 2 * k + 2), norms) for k in range(args.pairs)]
            rows[name] = {**summarize(runs), "runs": runs}
            (out / f"{stem}.json").write_text(json.dumps(rows, indent=1))
            (out / f"{stem}.md").write_text(render_pairs(rows, args))
            plot(rows, out / f"{stem}.png")
        print(render_pairs(rows, args))
        return
    rows = json.loads((out / "partial.json").read_text()) if args.append and (out / "partial.json").exists() else {}
    for name in args.models.split(","):
        rows[name] = run_model(name, args.epochs, train_set, test_set, args.stats, args.greedy_budget, norms=norms)
        (out / "partial.json").write_text(json.dumps(rows, indent=1))
        (out / "partial.md").write_text(render(rows, args))
        plot(rows, out / "partial.png")
    print(render(rows, args))


if __name__ == "__main__":
    main()

"""The report side of benchmarks/zoo_coverage.py: the Markdown table, summary and failure causes
written from the JSON rows."""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path

from zoo_runners import TIMM_MAX_PARAMS, TV_MAX_PARAMS


def _fmt(v, spec=".3f", none="-"):
    if v is None:
        return none
    if isinstance(v, float) and v != v:
        return none
    return format(v, spec)


def _pct(n, d):
    return f"{100 * n / d:.0f}% ({n}/{d})" if d else "-"


def _median(vs):
    vs = [v for v in vs if v is not None]
    return statistics.median(vs) if vs else None


def _log_line(i: int, n: int, row: dict) -> str:
    ap = row.get("autoperm") or {}
    if row.get("status") == "skipped":
        return f"[{i}/{n}] {row['key']}: skipped ({row.get('skip')})"
    if row.get("status") != "done":
        return f"[{i}/{n}] {row['key']}: {row.get('status')} {row.get('error')}"
    size = row.get("input_shape", ["?"])[-1]
    if ap.get("traced"):
        verdict = {True: "sound", False: "UNSOUND", None: "verify-crash"}[ap.get("verified")]
        s = (f"autoperm {size}px {verdict} groups={ap['groups']} param={ap['param_share']:.3f} "
             f"hidden={ap['hidden_share']:.3f} compile={ap['compile_s']:.1f}s verify={_fmt(ap.get('verify_s'), '.1f')}s")
    else:
        s = f"autoperm FAIL {ap.get('stage')} {ap.get('error', {}).get('type')}: {ap.get('error', {}).get('message', '')[:100]}"
    rb, tp = row.get("rebasin"), row.get("tp")
    if rb is not None:
        if rb.get("skipped"):
            s += " | rebasin skipped"
        elif rb.get("ran"):
            s += (f" | rebasin fn={'ok' if rb['function_preserved'] else 'BROKEN'} share={rb['permuted_share']:.3f} "
                  f"({rb['time_s']:.0f}s)")
        else:
            s += f" | rebasin FAIL {rb.get('error', {}).get('type')} ({_fmt(rb.get('time_s'), '.0f')}s)"
    if tp is not None:
        s += (f" | tp share={tp['coupled_share']:.3f} ({tp['time_s']:.1f}s)" if tp.get("ran")
              else f" | tp FAIL {tp.get('error', {}).get('type')}")
    return f"[{i}/{n}] {row['key']} ({row.get('wall_s', 0):.0f}s): {s}"


def _cause(row: dict) -> str | None:
    """The autoperm failure cause of a row, or None where it traced."""
    if row.get("status") == "skipped":
        return None
    if row.get("status") != "done":
        return f"{row.get('status')}: {row.get('error', {}).get('message', '')}"
    ap = row.get("autoperm") or {}
    if ap.get("traced"):
        return None
    err = ap.get("error") or {}
    return f"{ap.get('stage')}: {err.get('type')}: {err.get('message', '')[:160]}"


def _peer_cause(res: dict | None) -> str | None:
    if not res or res.get("ran") or res.get("skipped"):
        return None
    err = res.get("error") or {}
    return f"{err.get('type')}: {err.get('message', '')[:160]}"


def _short_cause(text: str) -> str:
    """Group causes: the message with model-specific numbers and names mostly removed."""
    import re

    t = re.sub(r"'[^']*'", "'…'", text)
    t = re.sub(r"\b\d+(\.\d+)?\b", "N", t)
    t = re.sub(r"\(shapes \[[^\]]*\]\)", "(shapes …)", t)
    return t[:200]


def _copy_peers(row: dict, peers: dict) -> None:
    """Fill ``row``'s peer columns from an earlier run's row of the same model and input shape."""
    old = peers.get(row.get("key"))
    if old and old.get("input_shape") == row.get("input_shape") and "rebasin" in old:
        row["rebasin"], row["tp"], row["peers_copied"] = old["rebasin"], old.get("tp"), True


def write_outputs(out: Path, meta: dict, rows: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "zoo_coverage.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))
    (out / "zoo_coverage.md").write_text(render_md(meta, rows))


def _summary(rows: list[dict]) -> dict:
    attempted = [r for r in rows if r.get("status") != "skipped"]
    traced = [r for r in attempted if (r.get("autoperm") or {}).get("traced")]
    nontriv = [r for r in traced if r["autoperm"].get("nontrivial")]
    sound = [r for r in traced if r["autoperm"].get("verified")]
    unsound = [r for r in traced if r["autoperm"].get("verified") is False]
    compile_s = [r["autoperm"]["compile_s"] for r in traced]
    rb_att = [r for r in attempted if r.get("rebasin") is not None and not r["rebasin"].get("skipped")]
    rb_ran = [r for r in rb_att if r["rebasin"].get("ran")]
    tp_att = [r for r in attempted if r.get("tp") is not None]
    tp_ran = [r for r in tp_att if r["tp"].get("ran")]
    return {
        "attempted": len(attempted), "skipped": len(rows) - len(attempted), "traced": len(traced),
        "verified": len(sound), "unsound": len(unsound), "nontrivial": len(nontriv),
        "compile_median_s": _median(compile_s), "compile_max_s": max(compile_s) if compile_s else None,
        "compile_cpu_median_s": _median([r["autoperm"].get("compile_cpu_s") for r in traced]),
        "compile_max_model": max(traced, key=lambda r: r["autoperm"]["compile_s"])["key"] if traced else None,
        "param_share_median": _median([r["autoperm"]["param_share"] for r in traced]),
        "hidden_share_median": _median([r["autoperm"]["hidden_share"] for r in traced]),
        "verify_median_s": _median([r["autoperm"].get("verify_s") for r in traced]),
        "rebasin_attempted": len(rb_att), "rebasin_ran": len(rb_ran),
        "rebasin_skipped": sum(1 for r in attempted if (r.get("rebasin") or {}).get("skipped")),
        "rebasin_preserved": sum(1 for r in rb_ran if r["rebasin"].get("function_preserved")),
        "rebasin_share_median": _median([r["rebasin"].get("permuted_share") for r in rb_ran]),
        "tp_attempted": len(tp_att), "tp_ran": len(tp_ran),
        "tp_share_median": _median([r["tp"].get("coupled_share") for r in tp_ran]),
    }


def render_md(meta: dict, rows: dict) -> str:
    allrows = list(rows.values())
    by_src = {s: [r for r in allrows if r["source"] == s] for s in ("torchvision", "timm")}
    by_src = {s: v for s, v in by_src.items() if v}
    if len(by_src) > 1:
        by_src["all"] = allrows
    L = ["# zoo coverage", "",
         ("How produced: " + ", then (resuming, rows already present kept) ".join(
             f"`{c.rsplit(' (', 1)[0]}` ({c.rsplit(' (', 1)[1]}" for c in meta["command_history"])
          if meta.get("command_history") else f"How produced: `{meta.get('command')}` ({meta.get('date')})")
         + f" (torch {meta['versions'].get('torch')}, "
         f"torchvision {meta['versions'].get('torchvision')}, timm {meta['versions'].get('timm')}, rebasin "
         f"{meta['versions'].get('rebasin')}, torch-pruning {meta['versions'].get('torch-pruning')}; autoperm "
         f"{meta['versions'].get('autoperm')} @ {meta['versions'].get('autoperm_git')}; {meta.get('threads')} torch thread(s) on "
         f"{meta.get('cpu_cores')} {meta.get('cpu')} cores).", "",
         "Every torchvision classification model and the first model (sorted by name) of each timm family "
         f"(defining module) with <= {TIMM_MAX_PARAMS / 1e6:.0f}M parameters; torchvision models above "
         f"{TV_MAX_PARAMS / 1e6:.0f}M are skipped. Random init, input 2x3x64x64 where the model accepts it, else its "
         "default size. **autoperm**: compile = `trace(verify=False)` wall time (export + analysis); verify = "
         "`verify_spec` (float64, perturbed parameters and buffers, no-fixed-point permutations) with seed 0, timed, "
         "and seeds 1 and 2; *non-trivial* = verified on all three seeds and some group of size >= 2. Shares are over "
         "traced models: param = share of parameter elements some group moves, hidden = share of hidden conv / linear "
         "/ embedding output channels in a group of size >= 2. "
         f"**rebasin**: `PermutationCoordinateDescent(a, b, x).rebasin(max_iterations={meta['config']['rebasin_iterations']})` "
         "with a, b two random inits, perturbed, float32; *ran* = finished within "
         f"{meta['config']['rebasin_timeout']:g} s; *fn preserved* = model b's output unchanged (relative error <= 1e-4, "
         "share of the models it ran on); *permuted share* = share of b's parameter elements in tensors whose values "
         "changed" + (f"; skipped above {meta['config']['rebasin_max_params'] / 1e6:.0f}M parameters"
                      if meta['config'].get('rebasin_max_params') else "") + ". "
         "**Torch-Pruning**: `DependencyGraph().build_dependency(model, example_inputs=x)` within "
         f"{meta['config']['tp_timeout']:g} s; *coupled share* = share of conv / linear output channels (excluding "
         "layers whose output is the model's output) lying in a group from `get_all_groups()` that prunes "
         "parameters of >= 2 layers. Times are wall-clock seconds on a machine that other jobs may share (each "
         "row's JSON has the 1-minute load average at its start, and the CPU seconds of compile and verify, "
         "which depend less on that load)." + (
             f" The peer columns are copied from {meta['peers_from']}, row by row (same model, same input "
             "shape; the peers' results do not depend on autoperm's analysis)." if meta.get("peers_from") else ""), ""]
    L += ["Observed peer limitations behind the failures below (rebasin 0.0.47 source, `rebasin/modules.py`): "
          "`OneDimModule` permutes a 1-D module's `weight` and `bias` but not BatchNorm's `running_mean` / "
          "`running_var`, so model b's function changes wherever those statistics are not the defaults 0 and 1 "
          "(as after training, or here after perturbation; with default statistics resnet18 keeps its function, "
          "relative error 5e-7); `initialize_module` selects special modules with `isinstance` but looks them up by "
          "exact type, so subclasses of `nn.LayerNorm` (torchvision's and timm's `LayerNorm2d`, timm's `LayerNorm`) "
          "raise `KeyError`.", ""]
    L += ["## Summary", "",
          "| source | models attempted | skipped (size) | traced | verified | non-trivial spec | UNSOUND | compile s median | "
          "compile s max (model) | compile CPU s median | verify s median | median param share | median hidden share | rebasin ran | rebasin fn preserved "
          "| rebasin median permuted share | Torch-Pruning ran | TP median coupled share |",
          "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for src, rs in by_src.items():
        s = _summary(rs)
        a = s["attempted"]
        L.append(f"| {src} | {a} | {s['skipped']} | {_pct(s['traced'], a)} | {_pct(s['verified'], a)} | "
                 f"{_pct(s['nontrivial'], a)} | {s['unsound']} | {_fmt(s['compile_median_s'], '.2f')} | "
                 f"{_fmt(s['compile_max_s'], '.1f')} ({s['compile_max_model']}) | {_fmt(s['compile_cpu_median_s'], '.2f')} | "
                 f"{_fmt(s['verify_median_s'], '.2f')} | "
                 f"{_fmt(s['param_share_median'])} | {_fmt(s['hidden_share_median'])} | "
                 f"{_pct(s['rebasin_ran'], s['rebasin_attempted'])} | {_pct(s['rebasin_preserved'], s['rebasin_ran'])} | "
                 f"{_fmt(s['rebasin_share_median'])} | {_pct(s['tp_ran'], s['tp_attempted'])} | "
                 f"{_fmt(s['tp_share_median'])} |")
    L.append("")
    rb_skip = [r["key"] for r in allrows if (r.get("rebasin") or {}).get("skipped")]
    if rb_skip:
        L += [f"rebasin not run (size limit) on {len(rb_skip)} models: {', '.join(rb_skip)}.", ""]

    # autoperm bugs first
    bugs = []
    for r in allrows:
        bug = _bug_of(r)
        prev = r.get("previous")
        if bug:
            bugs.append((r["key"], bug[0], bug[1], r.get("autoperm_code") or "?"))
        if prev and _bug_of(prev):
            what, msg = _bug_of(prev)
            now = f"; re-run at {r.get('autoperm_code') or '?'}: " + (bug[0] if bug else "no longer fails")
            bugs.append((r["key"], what + now, msg, prev.get("autoperm_code") or "before the re-run"))
    L += ["## autoperm crashes and UNSOUND specs", ""]
    if bugs:
        L += ["| model | what | error | autoperm code |", "| --- | --- | --- | --- |"]
        L += [f"| {k} | {w} | {m.replace('|', '/')} | {c} |" for k, w, m, c in bugs]
    else:
        L.append("None.")
    L.append("")

    L += ["## Models that fail, grouped by cause", "", "### autoperm", ""]
    L += _grouped(allrows, _cause)
    L += ["### rebasin", ""]
    L += _grouped(allrows, lambda r: _peer_cause(r.get("rebasin")))
    L += ["### Torch-Pruning", ""]
    L += _grouped(allrows, lambda r: _peer_cause(r.get("tp")))
    skipped = [r for r in allrows if r.get("status") == "skipped"]
    if skipped:
        L += ["### Skipped (size)", ""]
        L += [f"- {r['key']}: {r.get('skip')}" for r in skipped]
        L.append("")

    L += ["## Per model", "",
          "| model | params M | input | traced (frontend) | verified | groups (>=2) | frozen | unsupported ops | param share | "
          "hidden share | compile s | export s | analysis s | verify s | max verify err | autoperm error | rebasin | "
          "rebasin fn | rebasin share | rebasin s | TP | TP coupled share | TP s |",
          "| --- | ---: | --- | --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- "
          "| --- | ---: | ---: | --- | ---: | ---: |"]
    for r in allrows:
        n_params = r.get("params") or r.get("params_actual")
        p = _fmt(n_params / 1e6, ".1f") if n_params else "?"
        if r.get("status") == "skipped":
            L.append(f"| {r['key']} | {p} | - | skipped: {r.get('skip')} |" + " |" * 19)
            continue
        ap = r.get("autoperm") or {}
        size = "x".join(map(str, r["input_shape"])) if r.get("input_shape") else "-"
        if ap.get("traced"):
            ver = {True: "yes", False: "**UNSOUND**", None: "verify crashed"}[ap.get("verified")]
            errs = [v for v in (ap.get("verify_errors") or {}).values() if v is not None]
            unsup = ", ".join(f"{k.replace('aten.', '')} ({v})" for k, v in (ap.get("unsupported_ops") or {}).items()) or "-"
            cells = [f"yes ({ap.get('frontend')})", ver, f"{ap['groups']} ({ap['groups_ge2']})", str(ap["frozen"]),
                     unsup, _fmt(ap["param_share"]), _fmt(ap["hidden_share"]), _fmt(ap["compile_s"], ".2f"),
                     _fmt(ap.get("capture_s"), ".2f"), _fmt(ap.get("analysis_s"), ".3f"),
                     _fmt(ap.get("verify_s"), ".2f"), _fmt(max(errs) if errs else None, ".1e"), "-"]
        else:
            err = ap.get("error") or r.get("error") or {}
            cells = ["no", "-", "-", "-", "-", "-", "-", "-", "-", "-", "-", "-",
                     f"{ap.get('stage') or r.get('status')}: {err.get('type')}: {err.get('message', '')[:140]}"]
        rb = r.get("rebasin")
        if rb is None:
            cells += ["-", "-", "-", "-"]
        elif rb.get("skipped"):
            cells += ["skipped (size)", "-", "-", "-"]
        elif rb.get("ran"):
            cells += ["ran", "yes" if rb["function_preserved"] else f"**no** ({rb['output_error']:.1e})",
                      _fmt(rb["permuted_share"]), _fmt(rb.get("time_s"), ".0f")]
        else:
            cells += [f"fail: {rb['error']['type']}: {rb['error']['message'][:100]}", "-", "-", _fmt(rb.get("time_s"), ".0f")]
        tp = r.get("tp")
        if tp is None:
            cells += ["-", "-", "-"]
        elif tp.get("ran"):
            cells += ["ran", _fmt(tp["coupled_share"]), _fmt(tp.get("time_s"), ".1f")]
        else:
            cells += [f"fail: {tp['error']['type']}: {tp['error']['message'][:100]}", "-", _fmt(tp.get("time_s"), ".1f")]
        cells = [c.replace("|", "/").replace("\n", " ") for c in cells]
        L.append(f"| {r['key']} | {p} | {size} | " + " | ".join(cells) + " |")
    L.append("")
    return "\n".join(L)


def _bug_of(r: dict) -> tuple[str, str] | None:
    """(what, message) where a row shows an autoperm bug: a crash or an UNSOUND spec."""
    ap = r.get("autoperm") or {}
    if r.get("status") in ("worker crash", "worker error", "hard timeout"):
        return r["status"], (r.get("error") or {}).get("message", "")
    if ap.get("traced") and ap.get("verified") is False:
        msg = ap.get("unsound_error") or f"verify errors {ap.get('verify_errors')}, failing {ap.get('failing_groups')}"
        return "UNSOUND", msg.splitlines()[0][:600]
    if ap.get("traced") and ap.get("verified") is None:
        return "verify crashed", f"{ap['verify_error_exc']['type']}: {ap['verify_error_exc']['message']}"
    if not ap.get("traced") and ap.get("stage") == "trace" and (ap.get("error") or {}).get("type") not in (
            "TraceError", "ExampleInputError", "Timeout"):
        return "autoperm crash", f"{ap['error']['type']}: {ap['error']['message']}"
    return None


def _grouped(rows: list[dict], cause_of) -> list[str]:
    groups: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for r in rows:
        c = cause_of(r)
        if c:
            groups[_short_cause(c)].append((r["key"], c))
    if not groups:
        return ["None.", ""]
    out = []
    for short, items in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        out.append(f"- **{short.replace('|', '/')}** ({len(items)}): " + ", ".join(k for k, _ in items))
        first = items[0][1]
        if first != short:
            out.append(f"  - e.g. {items[0][0]}: {first.replace('|', '/')}")
    out.append("")
    return out

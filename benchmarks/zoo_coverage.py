"""Zoo coverage: autoperm.trace on every torchvision classification model and one model per timm
family, randomly initialized, beside two peers on the same models and inputs: snimu's `rebasin`
(PermutationCoordinateDescent) and Torch-Pruning's DependencyGraph.

Usage: python benchmarks/zoo_coverage.py [--source torchvision|timm|all] [--limit N]
           [--models a,b,c] [--skip-peers] [--out DIR] [--fresh]
Writes DIR/zoo_coverage.json (after every model, so an interrupted run resumes where it stopped;
``--fresh`` starts over) and DIR/zoo_coverage.md. Progress: one line per model on stderr.

Per model, autoperm: ``load(name, image_size=64)`` (the model's default size where it rejects
64x64), ``trace(verify=False)`` timed (compile = export + analysis), then the float64 check
``verify_spec`` with seed 0 (timed) and seeds 1, 2. Peers, each under a time limit:

* rebasin 0.0.47: ``PermutationCoordinateDescent(model_a, model_b, x).rebasin(max_iterations)``
  with model_a, model_b two random inits, every parameter and buffer perturbed
  (``autoperm.perturbed``, float32); measured: whether it runs, the share of model_b's parameter
  elements in tensors whose values changed, and whether model_b's output on x survives
  (relative error <= 1e-4).
* Torch-Pruning: ``DependencyGraph().build_dependency(model, example_inputs=x)``; measured: the
  share of conv / linear output channels (those not read only by the model output) that lie in a
  group pruning parameters of >= 2 layers.

Models are run in a worker subprocess (restarted after a crash, a hard timeout, or every
``--recycle`` models) so that one model cannot stall or kill the run.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import platform
import select
import signal
import statistics
import subprocess
import sys
import time
import traceback
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULT_PREFIX = "@@ROW "
TV_MAX_PARAMS = 150e6
TIMM_MAX_PARAMS = 120e6


# --------------------------------------------------------------------------- helpers

def _first_line(e: BaseException) -> str:
    msg = str(e).strip()
    return (msg.splitlines()[0] if msg else "")[:300]


def _err(e: BaseException) -> dict:
    return {"type": type(e).__name__, "message": _first_line(e)}


def _tb() -> str:
    """The current exception's traceback without the frames of copy.py (deep copies nest deeply)."""
    etype, exc, tb = sys.exc_info()
    frames = [f for f in traceback.extract_tb(tb) if not f.filename.endswith("/copy.py")]
    text = "".join(traceback.format_list(frames)) + "".join(traceback.format_exception_only(etype, exc))
    return text if len(text) <= 4000 else text[:1500] + "\n...\n" + text[-2500:]


class _Timeout(BaseException):
    """Raised by SIGALRM; a BaseException so that library ``except Exception`` cannot swallow it."""


@contextlib.contextmanager
def _time_limit(seconds: float):
    if not seconds or seconds <= 0:
        yield
        return

    def handler(signum, frame):
        raise _Timeout(f"time limit of {seconds:g} s exceeded")

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _count_meta(factory) -> int:
    """Parameters of ``factory()`` built on the meta device, or on the CPU where the meta build fails
    (torchvision's RegNets initialize with ops that have no meta kernel)."""
    import torch

    try:
        with torch.device("meta"):
            model = factory()
    except Exception:  # noqa: BLE001
        model = factory()
    n = sum(p.numel() for p in model.parameters())
    del model
    return n


def _versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for dist in ("torch", "torchvision", "timm", "autoperm", "rebasin", "torch-pruning", "torchview", "scipy"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = None
    try:
        out["autoperm_git"] = subprocess.run(["git", "-C", str(HERE.parent), "rev-parse", "--short", "HEAD"],
                                             capture_output=True, text=True).stdout.strip() or None
    except OSError:
        out["autoperm_git"] = None
    return out


# --------------------------------------------------------------------------- model selection

def select_models(source: str, names: list[str] | None, limit: int | None) -> list[dict]:
    """Candidates as dicts: source, name, key, params (meta count), skip (reason or None)."""
    import autoperm.zoo as zoo

    out: list[dict] = []
    wanted = None
    if names:
        wanted = {}
        for n in names:
            src, _, bare = n.rpartition(":")
            wanted.setdefault(bare, set()).add(src or None)

    def want(src: str, name: str) -> bool:
        return wanted is None or (name in wanted and (None in wanted[name] or src in wanted[name]))

    if source in ("torchvision", "all"):
        tv = zoo.import_torchvision()
        rows = []
        for name in sorted(tv.models.list_models(module=tv.models)):
            if not want("torchvision", name):
                continue
            row = {"source": "torchvision", "name": name, "key": f"torchvision:{name}", "family": None,
                   "params": None, "skip": None}
            try:
                row["params"] = _count_meta(lambda: tv.models.get_model(name, weights=None))
                if row["params"] > TV_MAX_PARAMS:
                    row["skip"] = f"{row['params'] / 1e6:.0f}M parameters > {TV_MAX_PARAMS / 1e6:.0f}M"
            except Exception as e:  # noqa: BLE001
                row["param_count_error"] = _err(e)
            rows.append(row)
        out += rows[:limit] if limit else rows

    if source in ("timm", "all"):
        timm = zoo.import_timm()
        rows = []
        if wanted is not None:  # explicit names: any timm model
            for name in sorted(timm.list_models()):
                if want("timm", name):
                    rows.append(_timm_candidate(timm, name, None, allow_large=False))
        else:
            first_by_module: dict[str, list[str]] = {}
            for module in sorted(timm.list_modules()):
                first_by_module[module] = timm.list_models(module=module)
            # order families by their first name in sorted list_models()
            for module, names_ in sorted(first_by_module.items(), key=lambda kv: kv[1][0] if kv[1] else "~"):
                if not names_:
                    continue
                chosen = None
                too_big = []
                for name in names_:
                    row = _timm_candidate(timm, name, module, allow_large=True)
                    if row["params"] is not None and row["params"] <= TIMM_MAX_PARAMS:
                        chosen = row
                        break
                    too_big.append(row)
                if chosen is None:
                    chosen = dict(too_big[0])
                    chosen["skip"] = f"no model of family {module!r} has <= {TIMM_MAX_PARAMS / 1e6:.0f}M parameters"
                elif too_big:
                    chosen["passed_over"] = [r["name"] for r in too_big]
                rows.append(chosen)
                if limit and len(rows) >= limit:
                    break
        out += rows[:limit] if limit else rows
    return out


def _timm_candidate(timm, name: str, module: str | None, allow_large: bool) -> dict:
    row = {"source": "timm", "name": name, "key": f"timm:{name}", "family": module, "params": None, "skip": None}
    try:
        row["params"] = _count_meta(lambda: timm.create_model(name, pretrained=False))
    except Exception as e:  # noqa: BLE001
        row["param_count_error"] = _err(e)
    if row["params"] is not None and row["params"] > TIMM_MAX_PARAMS and not allow_large:
        row["skip"] = f"{row['params'] / 1e6:.0f}M parameters > {TIMM_MAX_PARAMS / 1e6:.0f}M"
    return row


# --------------------------------------------------------------------------- worker: one model

def _run_autoperm(cand: dict, cfg: dict, row: dict):
    """Load + trace + verify; returns (model, inputs) for the peers (or (None, None))."""
    import torch

    import autoperm
    from autoperm.zoo import load

    ap = row["autoperm"] = {"traced": False}
    model = x = spec = None
    for size in (64, None):
        torch.manual_seed(0)
        try:
            t_load = time.perf_counter()
            model, x = load(cand["key"], image_size=size)
            ap["load_s"] = time.perf_counter() - t_load
        except Exception as e:  # noqa: BLE001
            if size == 64:
                ap["load64_error"] = _err(e)
                continue
            ap.update(stage="load", error=_err(e))
            return None, None
        row["input_shape"] = list(x[0].shape)
        row["image_size_arg"] = size
        row["params_actual"] = sum(p.numel() for p in model.parameters())
        try:
            with _time_limit(cfg["trace_timeout"]):
                t0, c0 = time.perf_counter(), time.process_time()
                spec = autoperm.trace(model, x, verify=False)
                ap["compile_s"] = time.perf_counter() - t0
                ap["compile_cpu_s"] = time.process_time() - c0
        except autoperm.ExampleInputError as e:
            if size == 64:
                ap["input64_error"] = _err(e)
                continue
            ap.update(stage="trace", error=_err(e))
        except _Timeout as e:
            ap.update(stage="trace", error=_err(e) | {"type": "Timeout"})
        except Exception as e:  # noqa: BLE001
            ap.update(stage="trace", error=_err(e))
            if not isinstance(e, autoperm.TraceError):
                ap["traceback"] = _tb()
        break
    if spec is None:
        return model, x
    sizes = [g.size for g in spec.groups]
    cov = autoperm.coverage(spec, model)
    ap.update(traced=True, frontend=spec.meta.get("frontend"), dynamic_batch=spec.meta.get("dynamic_batch"),
              capture_s=spec.meta.get("capture_s"), analysis_s=spec.meta.get("analysis_s"),
              groups=len(spec.groups), groups_ge2=sum(s >= 2 for s in sizes), max_group=max(sizes, default=0),
              frozen=len(spec.frozen), unsupported_ops=spec.meta.get("unsupported_ops", {}),
              param_share=cov.param_share, hidden_share=cov.hidden_share, hidden_atoms=cov.hidden_atoms)
    errors, failing = {}, {}
    t_verify = time.perf_counter()
    for seed in (0, 1, 2):
        try:
            with _time_limit(cfg["verify_timeout"]):
                t0, c0 = time.perf_counter(), time.process_time()
                if seed == 0:
                    rep = autoperm.verify_spec(model, spec, x, seed=0)
                    ap["verify_s"] = time.perf_counter() - t0
                    ap["verify_cpu_s"] = time.process_time() - c0
                else:
                    rep = autoperm.verify_spec(model, spec, x, seed=seed, raise_on_failure=False)
            errors[seed] = rep.error
            if rep.failing:
                failing[seed] = {k: float(v) for k, v in list(rep.failing.items())[:10]}
        except autoperm.UnsoundSpecError as e:
            ap["verify_s"] = time.perf_counter() - t0
            errors[seed] = float("inf")
            ap["unsound_error"] = str(e)[:2000]
        except _Timeout as e:
            ap.update(verify_error_exc=_err(e) | {"type": "Timeout"})
            break
        except Exception as e:  # noqa: BLE001
            ap.update(verify_error_exc=_err(e), traceback=_tb())
            break
    ap["verify_all_s"] = time.perf_counter() - t_verify
    ap["verify_errors"] = {str(k): v for k, v in errors.items()}
    if failing:
        ap["failing_groups"] = {str(k): v for k, v in failing.items()}
    ap["verified"] = len(errors) == 3 and all(v <= 1e-7 for v in errors.values())
    if "verify_error_exc" in ap:
        ap["verified"] = None  # the check itself did not complete
    ap["nontrivial"] = bool(ap["verified"]) and ap["max_group"] >= 2
    return model, x


def _run_rebasin(cand: dict, cfg: dict, model, x, image_size) -> dict:
    import torch

    import autoperm
    from autoperm.verify import output_error
    from autoperm.zoo import load

    res: dict = {"ran": False}
    params = sum(p.numel() for p in model.parameters())
    if cfg["rebasin_max_params"] and params > cfg["rebasin_max_params"]:
        res["skipped"] = f"{params / 1e6:.0f}M parameters > {cfg['rebasin_max_params'] / 1e6:.0f}M"
        return res
    t0 = time.perf_counter()
    try:
        with _time_limit(cfg["rebasin_timeout"]):
            import rebasin

            torch.manual_seed(1)  # a second random init of the same architecture
            model_b0, _ = load(cand["key"], image_size=image_size)
            model_a = autoperm.perturbed(model, seed=0, dtype=torch.float32)
            model_b = autoperm.perturbed(model_b0, seed=1, dtype=torch.float32)
            del model_b0
            xb = tuple(t.float() if t.is_floating_point() else t for t in x)
            with torch.no_grad():
                ref = model_b(*xb)
            before = {k: v.detach().clone() for k, v in model_b.named_parameters()}
            input_data = xb[0] if len(xb) == 1 else xb
            pcd = rebasin.PermutationCoordinateDescent(model_a, model_b, input_data)
            res["init_s"] = time.perf_counter() - t0
            pcd.rebasin(max_iterations=cfg["rebasin_iterations"])
            res["ran"] = True
            res["time_s"] = time.perf_counter() - t0
            after = dict(model_b.named_parameters())
            total = sum(v.numel() for v in before.values())
            changed = sum(v.numel() for k, v in before.items() if k in after and not torch.equal(after[k].detach(), v))
            res["permuted_share"] = changed / total if total else 0.0
            res["permuted_tensors"] = sum(1 for k, v in before.items() if k in after and not torch.equal(after[k].detach(), v))
            res["tensors"] = len(before)
            model_b.eval()
            with torch.no_grad():
                got = model_b(*xb)
            err = output_error(ref, got)
            res["output_error"] = err
            res["function_preserved"] = bool(err <= 1e-4)
    except _Timeout as e:
        res.update(error=_err(e) | {"type": "Timeout"}, time_s=time.perf_counter() - t0)
    except Exception as e:  # noqa: BLE001
        res.update(error=_err(e), time_s=time.perf_counter() - t0)
    return res


def _run_tp(cfg: dict, model, x) -> dict:
    import copy

    import torch
    from torch import nn

    res: dict = {"ran": False}
    t0 = time.perf_counter()
    layer_types = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
    try:
        with _time_limit(cfg["tp_timeout"]):
            import torch_pruning as tp

            work = copy.deepcopy(model).float().eval()
            xin = tuple(t.float() if t.is_floating_point() else t for t in x)
            with torch.enable_grad():
                dg = tp.DependencyGraph().build_dependency(work, example_inputs=xin[0] if len(xin) == 1 else xin,
                                                           verbose=False)
            res["build_s"] = time.perf_counter() - t0

            def out_ch(m):
                return m.out_channels if hasattr(m, "out_channels") else m.out_features

            layers = [m for m in work.modules() if isinstance(m, layer_types)]
            # hidden = not read only by the model output (its TP node has successors)
            hidden = {m: out_ch(m) for m in layers if not (m in dg.module2node and not dg.module2node[m].outputs)}
            covered: dict = {}
            n_groups = n_coupled = 0
            for group in dg.get_all_groups(root_module_types=layer_types):
                n_groups += 1
                touched = set()
                for dep, _ in group:
                    mod = dep.target.module
                    if isinstance(mod, nn.Parameter) or (isinstance(mod, nn.Module) and any(
                            True for _ in mod.parameters(recurse=False))):
                        touched.add(id(mod))
                if len(touched) < 2:
                    continue
                n_coupled += 1
                for dep, idxs in group:
                    mod = dep.target.module
                    if isinstance(mod, layer_types) and dg.is_out_channel_pruning_fn(dep.handler):
                        covered[mod] = max(covered.get(mod, 0), len(set(int(i) for i in idxs)))
            total = sum(hidden.values())
            res.update(ran=True, groups=n_groups, coupled_groups=n_coupled, hidden_channels=total,
                       coupled_share=(sum(min(v, hidden[m]) for m, v in covered.items() if m in hidden) / total)
                       if total else 0.0,
                       layers_untraced=sum(1 for m in layers if m not in dg.module2node))
            res["time_s"] = time.perf_counter() - t0
    except _Timeout as e:
        res.update(error=_err(e) | {"type": "Timeout"}, time_s=time.perf_counter() - t0)
    except Exception as e:  # noqa: BLE001
        res.update(error=_err(e), time_s=time.perf_counter() - t0)
    return res


def run_one(cand: dict, cfg: dict) -> dict:
    row = {k: cand.get(k) for k in ("source", "name", "key", "family", "params", "passed_over")}
    row["loadavg"] = os.getloadavg()[0]  # the machine may be shared: 1-min load average at the start
    t0 = time.perf_counter()
    model, x = _run_autoperm(cand, cfg, row)
    if not cfg["skip_peers"] and model is not None:
        row["rebasin"] = _run_rebasin(cand, cfg, model, x, row.get("image_size_arg"))
        row["tp"] = _run_tp(cfg, model, x)
    row["status"] = "done"
    row["wall_s"] = time.perf_counter() - t0
    return row


def worker_main(cfg: dict) -> None:
    """Read candidate dicts (JSON lines) on stdin, write RESULT_PREFIX + row per model."""
    import logging
    import warnings

    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything the libraries print goes to stderr, never into the protocol
    sys.stdout = sys.stderr
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.ERROR)
    import torch

    import autoperm.zoo as zoo

    torch.set_num_threads(cfg["threads"])
    zoo.import_timm()
    # autoperm is imported from the working tree, which may change during a long run: note its commit
    # and whether the package has uncommitted changes, per row
    git = ["git", "-C", str(HERE.parent)]
    try:
        head = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        dirty = bool(subprocess.run(git + ["status", "--porcelain", "--", "autoperm"], capture_output=True,
                                    text=True).stdout.strip())
        code_version = f"{head}{'+dirty' if dirty else ''}"
    except OSError:
        code_version = None
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        cand = json.loads(line)
        try:
            row = run_one(cand, cfg)
            row["autoperm_code"] = code_version
        except BaseException as e:  # noqa: BLE001
            row = {k: cand.get(k) for k in ("source", "name", "key", "family", "params")}
            row.update(status="worker error", error=_err(e), traceback=_tb())
        proto.write(RESULT_PREFIX + json.dumps(row, default=str) + "\n")
        proto.flush()


# --------------------------------------------------------------------------- parent

class Worker:
    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.proc = None
        self.served = 0

    def start(self):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(self.cfg)]
        env = dict(os.environ, OMP_NUM_THREADS=str(self.cfg["threads"]), MKL_NUM_THREADS=str(self.cfg["threads"]))
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1, env=env)
        self.served = 0

    def stop(self):
        if self.proc and self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except Exception:  # noqa: BLE001
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def run(self, cand: dict, hard_timeout: float) -> dict:
        if self.proc is None or self.proc.poll() is not None or self.served >= self.cfg["recycle"]:
            self.stop()
            self.start()
        self.served += 1
        base = {k: cand.get(k) for k in ("source", "name", "key", "family", "params")}
        try:
            self.proc.stdin.write(json.dumps(cand) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            self.kill()
            return base | {"status": "worker crash", "error": {"type": "WorkerCrash", "message": "broken pipe"}}
        deadline = time.monotonic() + hard_timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self.kill()
                return base | {"status": "hard timeout", "error": {
                    "type": "Timeout", "message": f"no result within {hard_timeout:g} s; worker killed"}}
            ready, _, _ = select.select([self.proc.stdout], [], [], min(left, 5.0))
            if not ready:
                continue
            line = self.proc.stdout.readline()
            if not line:
                rc = self.proc.wait()
                self.proc = None
                return base | {"status": "worker crash", "error": {
                    "type": "WorkerCrash", "message": f"worker exited with status {rc} (killed by the OS?)"}}
            if line.startswith(RESULT_PREFIX):
                return json.loads(line[len(RESULT_PREFIX):])


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


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", choices=("torchvision", "timm", "all"), default="all")
    ap.add_argument("--limit", type=int, default=None, help="at most N models per source")
    ap.add_argument("--models", default=None, help="comma-separated names (optionally source:name)")
    ap.add_argument("--skip-peers", action="store_true", help="autoperm only")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--fresh", action="store_true", help="ignore rows already in DIR/zoo_coverage.json")
    ap.add_argument("--trace-timeout", type=float, default=600)
    ap.add_argument("--verify-timeout", type=float, default=300, help="per seed")
    ap.add_argument("--rebasin-timeout", type=float, default=60)
    ap.add_argument("--rebasin-iterations", type=int, default=1,
                    help="max_iterations of rebasin(): one coordinate-descent sweep by default (the permuted share "
                         "and function preservation do not depend on convergence)")
    ap.add_argument("--rebasin-max-params", type=float, default=30e6,
                    help="skip rebasin above this many parameters (0: no limit)")
    ap.add_argument("--tp-timeout", type=float, default=30)
    ap.add_argument("--hard-timeout", type=float, default=1800, help="per model, kills the worker")
    ap.add_argument("--recycle", type=int, default=15, help="restart the worker after this many models")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads in the worker: 1 by default, since OpenMP threads spin-wait and slow "
                         "down by 10x or more when other jobs share the CPU cores")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--peers-from", default=None, metavar="JSON",
                    help="with --skip-peers: copy each model's rebasin / Torch-Pruning columns from an earlier "
                         "run's JSON (same model and input shape; the peers do not depend on autoperm)")
    ap.add_argument("--render-only", action="store_true", help="rewrite DIR/zoo_coverage.md from the JSON")
    ap.add_argument("--rerun-failed", action="store_true",
                    help="when resuming, run again the models whose row shows an autoperm crash or UNSOUND spec "
                         "(the earlier row is kept under 'previous')")
    args = ap.parse_args()
    if args.render_only:
        data = json.loads((Path(args.out) / "zoo_coverage.json").read_text())
        (Path(args.out) / "zoo_coverage.md").write_text(render_md(data["meta"], data["rows"]))
        return
    if args.worker is not None:
        worker_main(json.loads(args.worker))
        return

    import warnings

    warnings.filterwarnings("ignore")

    cfg = {"skip_peers": args.skip_peers, "trace_timeout": args.trace_timeout, "verify_timeout": args.verify_timeout,
           "rebasin_timeout": args.rebasin_timeout, "rebasin_iterations": args.rebasin_iterations,
           "rebasin_max_params": args.rebasin_max_params, "tp_timeout": args.tp_timeout, "recycle": args.recycle,
           "threads": args.threads}
    out = Path(args.out)
    names = [n.strip() for n in args.models.split(",") if n.strip()] if args.models else None
    t_sel = time.perf_counter()
    cands = select_models(args.source, names, args.limit)
    print(f"selected {len(cands)} models in {time.perf_counter() - t_sel:.0f}s "
          f"({sum(1 for c in cands if c['skip'])} skipped for size)", file=sys.stderr, flush=True)
    rows: dict = {}
    history: list[str] = []
    jpath = out / "zoo_coverage.json"
    if jpath.exists() and not args.fresh:
        try:
            old_data = json.loads(jpath.read_text())
            rows = old_data.get("rows", {})
            old_meta = old_data.get("meta", {})
            history = old_meta.get("command_history") or [f"{old_meta.get('command')} ({old_meta.get('date')})"]
        except (OSError, ValueError):
            rows = {}
    argv = " ".join(a if " " not in a else repr(a) for a in sys.argv[1:])
    meta = {"command": f"python benchmarks/zoo_coverage.py {argv}".strip(),
            "date": _dt.datetime.now().isoformat(timespec="seconds"), "versions": _versions(),
            "cpu": platform.processor() or platform.machine(), "cpu_cores": os.cpu_count(), "threads": args.threads,
            "config": cfg,
            "selection": {"tv_max_params": TV_MAX_PARAMS, "timm_max_params": TIMM_MAX_PARAMS}}
    meta["command_history"] = history + [f"{meta['command']} ({meta['date']})"] if history else []
    if rows and not names and not args.limit:  # a full run: drop rows of models no longer selected
        keys = {c["key"] for c in cands}
        srcs = {c["source"] for c in cands}
        rows = {k: r for k, r in rows.items() if k in keys or r.get("source") not in srcs}
    peers: dict = {}
    if args.peers_from:
        if not args.skip_peers:
            ap.error("--peers-from needs --skip-peers (it fills the peer columns of an autoperm-only run)")
        pdata = json.loads(Path(args.peers_from).read_text())
        peers = pdata["rows"]
        pm = pdata.get("meta", {})
        meta["peers_from"] = (f"{args.peers_from} ({pm.get('date')}; rebasin {pm.get('versions', {}).get('rebasin')}, "
                              f"torch-pruning {pm.get('versions', {}).get('torch-pruning')})")
        meta["config"] = {**cfg, **{k: v for k, v in pm.get("config", {}).items() if k.startswith(("rebasin", "tp"))}}
    worker = Worker(cfg)
    t_all = time.perf_counter()
    try:
        for i, cand in enumerate(cands, 1):
            key = cand["key"]
            old = rows.get(key)
            rerun = args.rerun_failed and old and _bug_of(old)
            if not cand["skip"] and not rerun and old and (old.get("status") == "skipped" or (
                    old.get("status") == "done" and (args.skip_peers or "rebasin" in old or not old.get("input_shape")))):
                if peers and "rebasin" not in old:
                    _copy_peers(old, peers)
                print(f"[{i}/{len(cands)}] {key}: already in {jpath.name}, kept", file=sys.stderr, flush=True)
                continue
            if cand["skip"]:
                row = {k: cand.get(k) for k in ("source", "name", "key", "family", "params", "skip")} | {"status": "skipped"}
            else:
                row = worker.run(cand, args.hard_timeout)
                _copy_peers(row, peers)
                if rerun:
                    row["previous"] = {k: old.get(k) for k in ("status", "error", "autoperm", "autoperm_code")}
            rows[key] = row
            meta["elapsed_s"] = time.perf_counter() - t_all
            write_outputs(out, meta, rows)
            print(_log_line(i, len(cands), row), file=sys.stderr, flush=True)
    finally:
        worker.stop()
    meta["elapsed_s"] = time.perf_counter() - t_all
    meta["finished"] = _dt.datetime.now().isoformat(timespec="seconds")
    write_outputs(out, meta, rows)
    print(f"wrote {out / 'zoo_coverage.md'} and {jpath} ({meta['elapsed_s'] / 60:.1f} min)", file=sys.stderr)


if __name__ == "__main__":
    main()

"""The worker side of benchmarks/zoo_coverage.py: which models to run, and autoperm and the two
peers (snimu's `rebasin`, Torch-Pruning) on one model, each under a time limit; a worker
process reads candidates on stdin and writes one JSON row per model."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import time
import traceback
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

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
import datetime as _dt
import json
import os
import platform
import select
import subprocess
import sys
import time
from pathlib import Path

from zoo_report import _bug_of, _copy_peers, _log_line, render_md, write_outputs  # noqa: E402
from zoo_runners import (HERE, RESULT_PREFIX, TIMM_MAX_PARAMS, TV_MAX_PARAMS, _versions,  # noqa: E402
                         select_models, worker_main)


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

"""Where a fine-tuning job's time goes: start-up (non-work) against work, per job layout.

Runs the demo's fine-tuning cells of one task x init x fraction (default ``brain_tissue``,
``none``, the config's first fraction and all its seeds) the way the workflow does, in
subprocesses, side by side in this one run (interleaved):

- ``cell``: one ``medclust finetune`` process per cell (``finetune.seeds_per_job: 1``, what a
  cluster runs: one job per cell);
- ``batch``: one ``medclust finetune-many`` process for all the cells (the local workflow with the
  demo's ``finetune.seeds_per_job``);
- ``baseline`` (with ``--baseline REV``): one ``medclust finetune`` per cell with the package
  source of git revision REV (e.g. the commit before a change), for before/after ratios.

The command lines (settings, stores, encoder) come from a Snakemake dry run of the config, so they
are the workflow's own. Each process runs under ``benchmarks/_phase_probe.py``, which timestamps
imports and the fine-tuning phases. **Work** is what a longer run would scale with: the optimiser
steps at the steady step time, validation, predicting, scoring and writing the outputs. **Non-work**
is the rest of the job's wall time: process start, imports (torch, MONAI; ``torch._dynamo``, which
torch's optimisers import at their first use), data set-up, model/optimiser set-up, the first step's
excess over a steady step, and interpreter exit. The last line is machine-readable::

    overhead_share=<batch job non-work / wall> cell_overhead_share=<...> [baseline_overhead_share=<...>]

Inputs: the task's slice stores (and ``results/pretrain/INIT/encoder.pt`` for an init other than
``none``) from ``results/`` if present, else built once by Snakemake in a temporary results folder
(the data stage of the task's datasets, ~1 min; plus pretraining for such an init).

    python benchmarks/startup.py                          # brain_tissue, init none, 3 seeds (~2 min)
    python benchmarks/startup.py --baseline 492986f       # plus the code of an older commit (~3 min)
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _baseline import REPO, baseline_source  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
PROBE = REPO / "benchmarks" / "_phase_probe.py"


# -- the workflow's command lines ---------------------------------------------------------------


def _run_dirs(results: Path, task: str, init: str, fraction: float, seeds: list[int]) -> list[str]:
    return [f"{results}/finetune/{task}/{init}/{float(fraction)}/{seed}" for seed in seeds]


def _needed_inputs(config: dict[str, Any], results: Path, task: str, init: str) -> list[Path]:
    entry = config["finetune"]["tasks"][task]
    datasets = {entry["dataset"], entry.get("train_dataset") or entry["dataset"]}
    needed = [results / "slices" / d / f for d in sorted(datasets) for f in ("index.json", "splits.json")]
    if init != "none":
        needed.append(results / "pretrain" / init / "encoder.pt")
    return needed


def _snakemake(args: list[str], results: Path) -> str:
    cmd = ["snakemake", *args, "--config", f"results_dir={results}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
    if proc.returncode:
        sys.exit(f"startup.py: `{shlex.join(cmd)}` failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout + proc.stderr


def workflow_cells(results: Path, task: str, init: str, fraction: float, seeds: list[int]) -> dict[str, Any]:
    """The job spec of the cells from a Snakemake dry run (per-cell or batched commands alike)."""
    targets = [f"{d}/model.pt" for d in _run_dirs(results, task, init, fraction, seeds)]
    text = _snakemake(["-n", "-p", "-f", *targets], results)
    spec: dict[str, Any] = {"cells": []}
    for line in text.splitlines():
        line = line.strip()
        if "medclust finetune" not in line:
            continue
        words = shlex.split(line[line.index("medclust finetune"):].split(" > ")[0])
        opts: dict[str, str] = {}
        i = 2
        while i < len(words):
            opts[words[i]] = words[i + 1]
            i += 2
        spec["settings"] = opts["--settings"]
        spec["slices"] = opts["--slices"]
        spec["train_slices"] = opts.get("--train-slices")
        if words[1] == "finetune-many":
            spec["cells"] += json.loads(opts["--cells"])["cells"]
        else:
            spec["cells"].append({"init": opts["--init"], "fraction": float(opts["--fraction"]), "seed": int(opts["--seed"]),
                                  "out": opts["--out"], "encoder": opts.get("--encoder")})
    if len(spec["cells"]) != len(seeds):
        sys.exit(f"startup.py: the dry run gave {len(spec['cells'])} cells for {len(seeds)} seeds:\n{text[-3000:]}")
    spec["cells"].sort(key=lambda c: int(c["seed"]))
    return spec


def cell_argv(spec: dict[str, Any], cell: dict[str, Any], out: Path) -> list[str]:
    argv = ["medclust", "finetune", "--settings", spec["settings"], "--slices", spec["slices"]]
    if spec.get("train_slices"):
        argv += ["--train-slices", spec["train_slices"]]
    if cell.get("encoder"):
        argv += ["--encoder", cell["encoder"]]
    return argv + ["--init", cell["init"], "--fraction", str(cell["fraction"]), "--seed", str(cell["seed"]),
                   "--threads", "1", "--out", str(out)]


def batch_argv(spec: dict[str, Any], outs: list[Path]) -> list[str]:
    cells = [{k: v for k, v in dict(c, out=str(o), log=f"{o}.log").items() if v is not None} for c, o in zip(spec["cells"], outs)]
    argv = ["medclust", "finetune-many", "--settings", spec["settings"], "--slices", spec["slices"]]
    if spec.get("train_slices"):
        argv += ["--train-slices", spec["train_slices"]]
    return argv + ["--cells", json.dumps({"cells": cells}), "--threads", "1"]


# -- one measured process -------------------------------------------------------------------------


def run_probed(argv: list[str], src: Path, work: Path, name: str) -> dict[str, Any]:
    """Run ``argv`` (a medclust command) under the phase probe with the package from ``src``."""
    record = work / f"{name}.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)  # the probe puts `src` first itself
    with open(work / f"{name}.log", "wb") as log:
        spawn = time.perf_counter()
        proc = subprocess.run([sys.executable, str(PROBE), str(record), str(src), *argv], cwd=REPO, env=env, stdout=log, stderr=log, check=False)
        done = time.perf_counter()
    if proc.returncode:
        sys.exit(f"startup.py: {name} failed (exit {proc.returncode}); see {work / (name + '.log')}")
    rec = json.loads(record.read_text(encoding="utf-8"))
    rec.update(spawn=spawn, done=done)
    return rec


def _imports_in(rec: dict[str, Any], a: float, b: float, name: str | None = None) -> float:
    return sum(d for t, d, n in rec["imports"] if a <= t < b and (name is None or n == name))


def analyse(rec: dict[str, Any]) -> dict[str, float]:
    """Seconds per phase of one process (see the module docstring), summed over its cells."""
    events = sorted(rec["events"])
    wall = rec["done"] - rec["spawn"]
    out = {k: 0.0 for k in ("data", "setup", "first_excess", "steps", "validation", "outputs", "work")}
    out.update(wall=wall, start=rec["boot"] - rec["spawn"], imports=sum(d for _, d, _ in rec["imports"]),
               dynamo=_imports_in(rec, 0, float("inf"), "torch._dynamo"), cells=0, steady_step=0.0)
    exit_t = next(t for t, n in events if n == "exit")
    out["teardown"] = rec["done"] - exit_t
    starts = [i for i, (_, n) in enumerate(events) if n == "cell_start"]
    steadies = []
    for k, i in enumerate(starts):
        seg = events[i : starts[k + 1] if k + 1 < len(starts) else len(events)]
        t = {}
        for when, n in seg:
            t.setdefault(n, []).append(when)
        first_batch = t["batches"][0]
        ends = t["step_end"]
        vals = list(zip(t.get("val_start", []), t.get("val_end", [])))
        val_time = sum(b - a for a, b in vals)
        durations = [ends[0] - first_batch]
        for prev, cur in itertools.pairwise(ends):
            durations.append(cur - prev - sum(b - a for a, b in vals if prev <= a < cur))
        steady = statistics.median(durations[1:]) if len(durations) > 1 else durations[0]
        steadies.append(steady)
        excess = max(0.0, durations[0] - steady)
        fit_end, cell_end = t["fit_end"][0], t["cell_end"][0]
        work = (fit_end - first_batch) - excess - _imports_in(rec, first_batch, fit_end) + (cell_end - fit_end) - _imports_in(rec, fit_end, cell_end)
        out["cells"] += 1
        out["data"] += t["data_end"][0] - t["data_start"][0] - _imports_in(rec, t["data_start"][0], t["data_end"][0])
        out["setup"] += first_batch - t["fit_start"][0] - _imports_in(rec, t["fit_start"][0], first_batch)
        out["first_excess"] += excess
        out["steps"] += steady * len(ends)
        out["validation"] += val_time
        out["outputs"] += (fit_end - first_batch) - sum(durations) - val_time + (cell_end - fit_end)
        out["work"] += work
    out["steady_step"] = statistics.mean(steadies)
    out["overhead"] = wall - out["work"]
    return out


def _sum(results: list[dict[str, float]]) -> dict[str, float]:
    total = {k: sum(r[k] for r in results) for k in results[0]}
    total["steady_step"] = statistics.mean(r["steady_step"] for r in results)
    return total


def _same_outputs(a: Path, b: Path) -> bool:
    import torch

    ma, mb = (json.loads((d / "metrics.json").read_text(encoding="utf-8")) for d in (a, b))
    wa, wb = (torch.load(d / "model.pt", map_location="cpu", weights_only=True) for d in (a, b))
    wa, wb = (w.get("state_dict", w) if isinstance(w, dict) else w for w in (wa, wb))
    same_w = wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    return ma == mb and same_w


def main() -> None:
    import yaml

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="brain_tissue")
    parser.add_argument("--init", default="none")
    parser.add_argument("--fraction", type=float, default=None, help="default: the config's first fraction")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default: the config's seeds")
    parser.add_argument("--results", type=Path, default=REPO / "results", help="results folder to take the stores from")
    parser.add_argument("--baseline", default=None, help="git revision whose medclust package to measure too")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (run folders, logs, records)")
    args = parser.parse_args()

    config = yaml.safe_load((REPO / "config.yaml").read_text(encoding="utf-8"))
    ft = config["finetune"]
    fraction = args.fraction if args.fraction is not None else float(ft["tasks"][args.task].get("fractions", ft["fractions"])[0])
    seeds = args.seeds or list(ft["tasks"][args.task].get("seeds", ft["seeds"]))
    work = Path(tempfile.mkdtemp(prefix="medclust_startup_"))
    try:
        results = args.results.resolve()
        missing = [p for p in _needed_inputs(config, results, args.task, args.init) if not p.exists()]
        if missing:
            results = work / "results"
            print(f"building the inputs in {results} (missing: {', '.join(map(str, missing))}) ...", flush=True)
            _snakemake(["--cores", "2", *map(str, _needed_inputs(config, results, args.task, args.init))], results)
        spec = workflow_cells(results, args.task, args.init, fraction, seeds)
        src_now = REPO
        src_old = baseline_source(args.baseline, work) if args.baseline else None
        load = os.getloadavg()

        modes: dict[str, list[dict[str, Any]]] = {"cell": [], "batch": [], "baseline": []}
        outs = {m: [work / m / str(c["seed"]) for c in spec["cells"]] for m in modes}
        for i, cell in enumerate(spec["cells"]):
            if src_old is not None:
                modes["baseline"].append(run_probed(cell_argv(spec, cell, outs["baseline"][i]), src_old, work, f"baseline{i}"))
            modes["cell"].append(run_probed(cell_argv(spec, cell, outs["cell"][i]), src_now, work, f"cell{i}"))
            if i == 0:
                modes["batch"].append(run_probed(batch_argv(spec, outs["batch"]), src_now, work, "batch"))
        load = (load, os.getloadavg())
        stats = {m: _sum([analyse(r) for r in recs]) for m, recs in modes.items() if recs}

        n = len(spec["cells"])
        print(f"\n{args.task} / {args.init} / fraction {fraction} / seeds {seeds}: {n} cells, "
              f"load average {load[0][0]:.2f} at start, {load[1][0]:.2f} at end ({os.cpu_count()} CPUs)")
        cols = [m for m in ("baseline", "cell", "batch") if m in stats]
        heads = {"baseline": f"baseline {args.baseline}"[:22], "cell": f"{n} x finetune", "batch": "1 x finetune-many"}
        print(f"{'seconds (sum over the jobs)':34}" + "".join(f"{heads[m]:>24}" for m in cols))
        rows = [
            ("job wall", "wall"), ("non-work", "overhead"), ("  process start", "start"), ("  imports", "imports"),
            ("    of which torch._dynamo", "dynamo"), ("  data set-up", "data"), ("  model/optimiser set-up", "setup"),
            ("  first step excess", "first_excess"), ("  interpreter exit", "teardown"), ("work", "work"),
            ("  optimiser steps (steady)", "steps"), ("  validation", "validation"),
            ("  predict, score, write", "outputs"), ("steady step", "steady_step"),
        ]
        for label, key in rows:
            print(f"{label:34}" + "".join(f"{stats[m][key]:24.2f}" for m in cols))
        shares = {m: stats[m]["overhead"] / stats[m]["wall"] for m in cols}
        print(f"{'non-work share':34}" + "".join(f"{shares[m]:24.3f}" for m in cols))
        print(f"{'wall / batch wall':34}" + "".join(f"{stats[m]['wall'] / stats['batch']['wall']:24.2f}" for m in cols))
        same = all(_same_outputs(outs["cell"][i], outs["batch"][i]) for i in range(n))
        line = f"same outputs (metrics.json, model.pt) cell vs batch: {'yes' if same else 'NO'}"
        if src_old is not None:
            same_old = all(_same_outputs(outs["cell"][i], outs["baseline"][i]) for i in range(n))
            line += f"; cell vs baseline: {'yes' if same_old else 'NO'}"
        print(line)
        final = f"overhead_share={shares['batch']:.3f} cell_overhead_share={shares['cell']:.3f}"
        if "baseline" in shares:
            final += f" baseline_overhead_share={shares['baseline']:.3f}"
        print(final + f" load_start={load[0][0]:.2f} load_end={load[1][0]:.2f}")
    finally:
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

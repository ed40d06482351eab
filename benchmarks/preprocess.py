"""Preprocessing speed against plain loading, per demo case, and the data stage's wall time.

1. For every case of the default config's datasets (the demo data must have been fetched, e.g.
   by ``snakemake --cores 2 data``), in a worker process, interleaved and repeated:
   - ``load``: merely reading and decompressing the case's files with the plain library
     (nibabel ``np.asanyarray(img.dataobj)`` for NIfTI, SimpleITK for a DICOM series, pydicom
     ``pixel_array`` for a 2D DICOM; image and label): the floor;
   - ``preprocess``: ``medclust.preprocess.preprocess_case`` (read, QC-free preprocessing,
     HDF5 write), imports warmed up beforehand.
   The ratio preprocess / load (median over the repeats of each repeat's back-to-back pair) is
   the number to watch (targets: <= 1.2 for the CTs, <= 1.5 for the brain MR templates). With
   ``--baseline REV`` a second worker runs the ``medclust`` package of git revision REV, repeat
   by repeat in turn with the first, so before and after are measured side by side under the
   same machine load. For the CTs and MRs the worker also times preprocessing's own read of
   the files and its HDF5 store write, fixed costs whatever the computation: the room a target
   leaves the computation is ``target x load - read - write`` (printed per case, with what the
   computation takes now). ``--memory``: peak resident memory of a
   fresh process preprocessing each case (minus that of a process that only imports the same
   modules).
2. With ``--data-stage`` (minutes): the whole data stage (``snakemake data``) on the default
   config with ``--cores 1`` and then ``--cores 2``, each into a fresh temporary
   ``results_dir`` (the fetched demo data are reused). Where a SLURM client is installed but no
   controller answers, the runs skip the SLURM plugin's ~9 s start-up probe (see
   ``_workflow_env``; ``--keep-slurm-probe`` keeps it).

The last line is machine-readable: ``max_ct_ratio=<max over the demo CTs of preprocess/load>
max_mr_ratio=<max over the brain MR templates>`` (the current code; ``baseline_...`` for REV),
``ct_room_ms=… mr_room_ms=…`` (the least room over each kind's cases, ms), plus
``data_stage_speedup_2v1=`` with ``--data-stage``.

Usage::

    python benchmarks/preprocess.py [--repeats 5] [--baseline REV] [--memory] [--data-stage]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

from _baseline import REPO, baseline_source  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

TARGETS = {"CT": 1.2, "MR": 1.5}  # preprocess / load, issue 12


def _plain_load(path: str, series_uid: str | None = None) -> None:
    """Read + decompress with the plain library, nothing else."""
    import nibabel as nib
    import numpy as np

    p = Path(path)
    if p.is_dir():
        import SimpleITK as sitk

        reader = sitk.ImageSeriesReader()
        ids = reader.GetGDCMSeriesIDs(str(p))
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(p), series_uid or ids[0]))
        sitk.GetArrayViewFromImage(reader.Execute())
    elif p.name.lower().endswith((".nii", ".nii.gz")):
        np.asanyarray(nib.load(str(p)).dataobj)
    elif p.name.lower().endswith((".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")):
        from PIL import Image

        with Image.open(p) as img:
            img.load()
    else:
        import pydicom

        pydicom.dcmread(str(p)).pixel_array  # noqa: B018 - decoding is the point


def _cases(config: dict) -> list[tuple[str, object, dict]]:
    from medclust.io.sources import discover

    found = []
    for name, entry in config["datasets"].items():
        settings = dict(entry, name=name)
        if entry["format"] == "drr":
            settings["path"] = str(Path(config["results_dir"]) / "drr" / name / "manifest.tsv")
        if not Path(str(settings.get("path", ""))).exists():
            print(f"  (skipping {name}: {settings.get('path')} not found)", file=sys.stderr)
            continue
        prep = dict(config["preprocess"], **entry.get("preprocess", {}))
        assume = entry.get("assume_pixel_spacing")
        for case in discover(settings):
            if case.error is None:
                if assume is not None:  # as ingest sets it
                    case.assume_spacing = (float(assume[0]), float(assume[1]))
                found.append((name, case, prep))
    return found


def _peak_rss_mb(code: str) -> float:
    """Peak RSS (MB) of a fresh Python process running ``code``."""
    # VmHWM (not getrusage's ru_maxrss, which a child inherits from the forking parent's peak).
    script = code + (
        "\nimport re; print(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status', encoding='utf-8').read()).group(1))"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, encoding="utf-8", cwd=REPO, check=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1024


def _use_package(src: Path) -> None:
    """Import ``medclust`` from ``src`` (ahead of an editable install's finder, which would win over sys.path)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "medclust", src / "medclust" / "__init__.py", submodule_search_locations=[str(src / "medclust")]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["medclust"] = module
    spec.loader.exec_module(module)


def worker(src: Path) -> None:
    """Serve timing requests on stdin (one JSON line per case), answer one JSON line each."""
    _use_package(src)
    import torch

    from medclust.io.sources import CaseEntry
    from medclust.preprocess.pipeline import PreprocessSettings, preprocess_case

    torch.set_num_threads(1)
    os.chdir(REPO)
    with tempfile.TemporaryDirectory() as tmp:
        for line in sys.stdin:
            job = json.loads(line)
            case, name = CaseEntry.from_dict(job["case"]), job["dataset"]
            settings = PreprocessSettings.from_dict(job["prep"])
            out = Path(tmp) / "case.h5"
            times: dict[str, list[float]] = {k: [] for k in ("load", "prep", "load_cpu", "prep_cpu", "read", "write", "pass")}
            for _ in range(job["repeats"]):
                for key in ("load", "prep"):
                    t0, c0 = time.perf_counter(), time.process_time()
                    if key == "load":
                        _plain_load(case.image, case.series_uid)
                        if case.label:
                            _plain_load(case.label)
                    else:
                        preprocess_case(case, settings, out, name)
                    times[key].append(time.perf_counter() - t0)
                    times[key + "_cpu"].append(time.process_time() - c0)
                if job["parts"]:
                    read, one_pass = _own_read(case)
                    times["read"].append(read)
                    times["pass"].append(one_pass)
                    times["write"].append(_store_write(out, Path(tmp) / "again.h5", settings.dtype))
            print(json.dumps(times), flush=True)


def _own_read(case: Any) -> tuple[float, float]:
    """Seconds for ``preprocess_case``'s own reading of the case's files (the same calls), and for
    one pass over the image's voxels (a float32 copy: the least any anti-aliasing that reads
    every voxel does)."""
    import numpy as np

    from medclust.io.readers import load_image

    t0 = time.perf_counter()
    image = load_image(
        case.image, case.series_uid, resample_gaps=case.resample_gaps, assume_spacing=case.assume_spacing, unscaled=True
    )
    if case.label:
        load_image(case.label, label=True)
    t1 = time.perf_counter()
    image.array.astype(np.float32)
    return t1 - t0, time.perf_counter() - t1


def _store_write(written: Path, again: Path, dtype: str) -> float:
    """Seconds for writing the stored arrays and attributes of ``written`` once more (``write_case``)."""
    import numpy as np

    from medclust.io.slice_store import read_case, write_case

    stored = read_case(written)
    image = stored.image.astype(np.float32)  # as preprocessing hands it over
    t0 = time.perf_counter()
    write_case(again, image, stored.attrs, label=stored.label, dtype=dtype)
    return time.perf_counter() - t0


class Worker:
    """A ``worker`` process running the ``medclust`` package of ``src``."""

    def __init__(self, src: Path) -> None:
        env = dict(os.environ, OMP_NUM_THREADS="1")
        env.pop("PYTHONPATH", None)
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--worker", str(src)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            text=True, encoding="utf-8", cwd=REPO, env=env,
        )

    def time(self, name: str, case: Any, prep: dict, repeats: int, parts: bool = False) -> dict[str, list[float]]:
        """Timings of ``repeats`` load/preprocess pairs; ``parts`` adds preprocessing's own read and store write."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        job = {"dataset": name, "case": case.to_dict(), "prep": prep, "repeats": repeats, "parts": parts}
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            sys.exit(f"preprocess benchmark worker died (exit {self.proc.wait()})")
        return json.loads(line)

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait()


def _kind(name: str, config: dict, shape: list[int]) -> str:
    modality = str(config["datasets"][name].get("modality", "")).upper()
    return modality if len(shape) == 3 and modality in ("CT", "MR") else "2D"


def bench_cases(repeats: int, memory: bool, baseline: str | None) -> list[dict]:
    from medclust.config import load_config

    os.chdir(REPO)
    config = load_config(REPO / "config.yaml")
    cases = _cases(config)
    if not cases:
        sys.exit("no demo cases found: run `snakemake --cores 2 data` first (it fetches the demo data)")
    workers = {"now": Worker(REPO)}
    tmp = tempfile.TemporaryDirectory(prefix="medclust-prep-bench-")
    if baseline:
        workers["before"] = Worker(baseline_source(baseline, Path(tmp.name)))
    rows = []
    try:
        name, case, prep = cases[0]
        for w in workers.values():  # imports and file caches warmed up
            w.time(name, case, prep, 1)
        for name, case, prep in cases:
            row: dict[str, Any] = {"dataset": name, "case": case.case_id, "label": bool(case.label)}
            row["shape"] = _shape(case)
            row["kind"] = _kind(name, config, row["shape"])
            # repeat by repeat in turn, so the two packages share the machine's load; the ratio is
            # the median of each repeat's preprocess / load, timed back to back
            times: dict[str, dict[str, list[float]]] = {key: {} for key in workers}
            for _ in range(repeats):
                for key, w in workers.items():
                    for k, v in w.time(name, case, prep, 1, parts=key == "now" and row["kind"] in TARGETS).items():
                        times[key].setdefault(k, []).extend(v)
            for key, t in times.items():
                med = {k: statistics.median(v) for k, v in t.items() if v}
                ratio = statistics.median(p / l for p, l in zip(t["prep"], t["load"]))
                ratio_cpu = statistics.median(p / l for p, l in zip(t["prep_cpu"], t["load_cpu"]))
                row[key] = {**med, "ratio": ratio, "ratio_cpu": ratio_cpu}
            row["rss_mb"] = _rss(name, case, prep) if memory else 0.0
            rows.append(row)
            done = " | ".join(f"{k}: load {row[k]['load']:.3f} s, preprocess {row[k]['prep']:.3f} s, ratio {row[k]['ratio']:.2f}" for k in workers)
            print(f"  {name}/{case.case_id}: {done}", file=sys.stderr)
    finally:
        for w in workers.values():
            w.close()
        tmp.cleanup()
    return rows


def _shape(case: Any) -> list[int]:
    from medclust.io.readers import load_image

    return list(load_image(case.image, case.series_uid, assume_spacing=case.assume_spacing, unscaled=True).array.shape)


def _rss(name: str, case: Any, prep: dict) -> float:
    imports = "import torch, monai.transforms, medclust.preprocess.pipeline, nibabel, SimpleITK, pydicom, h5py"
    with tempfile.TemporaryDirectory() as tmp:
        code = (
            f"{imports}\nfrom medclust.io.sources import CaseEntry\n"
            f"from medclust.preprocess.pipeline import preprocess_case\n"
            f"preprocess_case(CaseEntry.from_dict({case.to_dict()!r}), {prep!r}, {str(Path(tmp) / 'm.h5')!r}, {name!r})"
        )
        return _peak_rss_mb(code) - _peak_rss_mb(imports)


def _workflow_env(shim_dir: Path, keep_probe: bool) -> dict[str, str]:
    """The environment of the timed ``snakemake`` runs.

    snakemake-executor-plugin-slurm runs ``scontrol show config`` (10 s timeout) whenever
    snakemake loads its plugins, i.e. at every start, local runs included. Where a SLURM client
    is installed but no controller answers (this development machine between CI runs), each
    start idles ~9 s for it, with 1 core as with 2: no part of the data stage, and absent on a
    workstation without SLURM (no ``scontrol``) and on a cluster (the controller answers). Then,
    unless ``keep_probe``, the runs find first in PATH an ``scontrol`` that fails at once, as on
    a machine without SLURM; a line says which applies.
    """
    import shutil

    env = dict(os.environ)
    if shutil.which("scontrol") is None:
        print("SLURM client: none (snakemake starts without the plugin's probe)")
        return env
    try:
        t0 = time.perf_counter()
        subprocess.run(["scontrol", "show", "config"], capture_output=True, timeout=3, check=False)
        print(f"SLURM client: `scontrol show config` answered in {time.perf_counter() - t0:.1f} s (kept)")
        return env
    except subprocess.TimeoutExpired:
        pass
    if keep_probe:
        print("SLURM client: no controller answers; kept (every snakemake start idles ~9 s)")
        return env
    (shim_dir / "scontrol").write_text("#!/bin/sh\nexit 1\n", encoding="utf-8")
    (shim_dir / "scontrol").chmod(0o755)
    env["PATH"] = f"{shim_dir}{os.pathsep}{env.get('PATH', '')}"
    print(
        "SLURM client: no controller answers `scontrol show config` within 3 s; the runs use an "
        "`scontrol` that fails at once (as without SLURM), not the plugin's ~9 s idle per start"
    )
    return env


def bench_workflow(cores_list: list[int], keep_probe: bool = False) -> list[tuple[int, float, float, int]]:
    """(cores, wall s, CPU s of all jobs, jobs) per run; CPU time is what contention does not inflate."""
    import resource

    results = []
    shim = tempfile.TemporaryDirectory(prefix="medclust-bench-shim-")
    env = _workflow_env(Path(shim.name), keep_probe)
    for cores in cores_list:
        with tempfile.TemporaryDirectory(prefix="medclust-bench-") as tmp:
            # mtime-only rerun triggers: the fetched demo data count as up to date whatever their
            # rule's code history in .snakemake says, so only the data stage proper is timed.
            command = [
                "snakemake", "--cores", str(cores), "data", "--rerun-triggers", "mtime",
                "--config", f"results_dir={tmp}/results", "--quiet", "all",
            ]
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            t0 = time.perf_counter()
            done = subprocess.run(
                command, cwd=REPO, env=env, capture_output=True, text=True, encoding="utf-8", errors="replace", check=False
            )
            wall = time.perf_counter() - t0
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
            if done.returncode != 0:
                print(done.stdout[-3000:], done.stderr[-3000:], file=sys.stderr)
                sys.exit(f"snakemake --cores {cores} data failed")
            jobs = len(list((Path(tmp) / "results" / "logs").rglob("*.log")))
            results.append((cores, wall, cpu, jobs))
            print(f"  snakemake --cores {cores} data: {wall:.1f} s wall, {cpu:.1f} s CPU ({jobs} jobs)", file=sys.stderr)
    shim.cleanup()
    return results


def _print_cases(rows: list[dict], repeats: int, baseline: str | None) -> dict[str, float]:
    keys = ["before", "now"] if baseline else ["now"]
    print(f"\nPreprocessing vs plain load+decompress (median of {repeats}, one torch thread)"
          + (f"; before = {baseline}, now = this checkout" if baseline else ""))
    header = f"{'dataset/case':38s} {'shape':>13s} {'label':>5s} {'load s':>7s}"
    for k in keys:
        header += f" {k + ' s':>9s} {k + ' ratio':>12s} {'(CPU)':>6s}"
    header += f" {'+RSS MB':>8s}" if any(r["rss_mb"] for r in rows) else ""
    print(header)
    print("-" * len(header))
    for r in rows:
        line = f"{r['dataset'] + '/' + r['case']:38s} {'x'.join(map(str, r['shape'])):>13s} {'yes' if r['label'] else 'no':>5s} {r['now']['load']:7.3f}"
        for k in keys:
            line += f" {r[k]['prep']:9.3f} {r[k]['ratio']:12.2f} {r[k]['ratio_cpu']:6.2f}"
        line += f" {r['rss_mb']:8.0f}" if any(x["rss_mb"] for x in rows) else ""
        print(line)
    worst = {}
    for k in keys:
        for kind in TARGETS:
            values = [r[k]["ratio"] for r in rows if r["kind"] == kind]
            if values:
                worst[f"{'' if k == 'now' else 'baseline_'}max_{kind.lower()}_ratio"] = max(values)
    print("worst ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in worst.items())
          + " (targets: " + ", ".join(f"{kind} <= {t}" for kind, t in TARGETS.items()) + ")")
    return worst | _print_room(rows)


def _print_room(rows: list[dict]) -> dict[str, float]:
    """What each target leaves for the computation once the case is read and its store written.

    Both are fixed costs of the stage's contract whatever the computation: preprocessing reads
    the same files the floor does (with medclust's readers) and writes the HDF5 store. The
    room left, target x load - read - write, is what anti-aliasing, resampling, normalising and
    the label lookup may take together.
    """
    timed = [r for r in rows if r["kind"] in TARGETS and "read" in r["now"]]
    if not timed:
        return {}
    print("\nRoom each target leaves (this checkout, wall ms, medians): room = target x load - read - write;"
          " computation = preprocess - read - write; one pass = a float32 copy of the image's voxels")
    header = (f"{'dataset/case':38s} {'target':>6s} {'load':>7s} {'read':>7s} {'write':>7s} {'room':>7s} "
              f"{'computation':>12s} {'one pass':>9s}")
    print(header)
    print("-" * len(header))
    room: dict[str, float] = {}
    for r in timed:
        t, ms = TARGETS[r["kind"]], {k: 1e3 * v for k, v in r["now"].items() if isinstance(v, float)}
        left = t * ms["load"] - ms["read"] - ms["write"]
        print(f"{r['dataset'] + '/' + r['case']:38s} {t:6.1f} {ms['load']:7.1f} {ms['read']:7.1f} {ms['write']:7.1f} "
              f"{left:7.1f} {ms['prep'] - ms['read'] - ms['write']:12.1f} {ms['pass']:9.1f}")
        key = f"{r['kind'].lower()}_room_ms"
        room[key] = min(room.get(key, left), left)
    return room


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        worker(Path(sys.argv[2]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timings per case (median reported)")
    parser.add_argument("--baseline", default=None, help="git revision whose medclust package to time beside this checkout")
    parser.add_argument("--memory", action="store_true", help="peak memory of a fresh process per case (slow)")
    parser.add_argument("--data-stage", action="store_true", help="also time `snakemake data` with --cores 1 and 2 (minutes)")
    parser.add_argument("--skip-cases", action="store_true", help="only time the data stage")
    parser.add_argument(
        "--keep-slurm-probe", action="store_true",
        help="time snakemake with the SLURM plugin's start-up probe even where no controller answers (~9 s idle per run)",
    )
    args = parser.parse_args()

    load_start = os.getloadavg()[0]
    print(f"host: {os.uname().nodename}, {os.cpu_count()} CPUs, load average {load_start:.2f}")
    final: dict[str, float] = {}
    if not args.skip_cases:
        rows = bench_cases(args.repeats, memory=args.memory, baseline=args.baseline)
        final.update(_print_cases(rows, args.repeats, args.baseline))
    if args.data_stage:
        print("\nWhole data stage on the default config (fresh results_dir, demo data already fetched)")
        print(f"load average before: {os.getloadavg()[0]:.2f}")
        walls = bench_workflow([1, 2], keep_probe=args.keep_slurm_probe)
        print(f"{'cores':>5s} {'wall s':>8s} {'CPU s':>8s} {'jobs':>5s}")
        for cores, wall, cpu, jobs in walls:
            print(f"{cores:5d} {wall:8.1f} {cpu:8.1f} {jobs:5d}")
        final["data_stage_speedup_2v1"] = walls[0][1] / walls[1][1]
        print(f"speed-up 2 cores vs 1: {final['data_stage_speedup_2v1']:.2f}x")
    load_end = os.getloadavg()[0]
    print(f"load average at the end: {load_end:.2f}")
    print(" ".join(f"{k}={v:.2f}" for k, v in final.items()) + f" load_start={load_start:.2f} load_end={load_end:.2f}")


if __name__ == "__main__":
    main()

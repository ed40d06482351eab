"""Preprocessing speed against plain loading, per demo case, and the data stage's wall time.

1. For every case of the default config's datasets (the demo data must have been fetched, e.g.
   by ``snakemake --cores 2 data``), side by side in this one process, interleaved and repeated:
   - ``load``: merely reading and decompressing the case's files with the plain library
     (nibabel ``np.asanyarray(img.dataobj)`` for NIfTI, SimpleITK for a DICOM series, pydicom
     ``pixel_array`` for a 2D DICOM; image and label);
   - ``preprocess``: ``medclust.preprocess.preprocess_case`` (read, QC-free preprocessing,
     HDF5 write), imports warmed up beforehand.
   The ratio preprocess / load is the number to watch (target <= 1.5). Peak resident memory of
   a fresh process preprocessing the case is reported beside it (minus that of a process that
   only imports the same modules).
2. The whole data stage (``snakemake data``) on the default config with ``--cores 1`` and then
   ``--cores 2``, each into a fresh temporary ``results_dir`` (the fetched demo data are reused).

Usage::

    python benchmarks/preprocess.py [--repeats 3] [--skip-workflow] [--skip-memory] [--skip-cases]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]


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
        for case in discover(settings):
            if case.error is None:
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


def bench_cases(repeats: int, memory: bool) -> list[dict]:
    import torch

    from medclust.config import load_config
    from medclust.preprocess.pipeline import PreprocessSettings, preprocess_case

    torch.set_num_threads(1)
    os.chdir(REPO)
    config = load_config(REPO / "config.yaml")
    cases = _cases(config)
    if not cases:
        sys.exit("no demo cases found: run `snakemake --cores 2 data` first (it fetches the demo data)")
    rows = []
    imports = "import torch, monai.transforms, medclust.preprocess.pipeline, nibabel, SimpleITK, pydicom, h5py"
    base_rss = _peak_rss_mb(imports) if memory else 0.0
    with tempfile.TemporaryDirectory() as tmp:
        # Warm up imports and caches (file system cache too: both paths read the same bytes).
        name, case, prep = cases[0]
        preprocess_case(case, PreprocessSettings.from_dict(prep), Path(tmp) / "warm.h5", name)
        for name, case, prep in cases:
            settings = PreprocessSettings.from_dict(prep)
            load_times, prep_times = [], []
            for _ in range(repeats):
                t0 = time.perf_counter()
                _plain_load(case.image, case.series_uid)
                if case.label:
                    _plain_load(case.label)
                load_times.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                out = preprocess_case(case, settings, Path(tmp) / f"{case.case_id}.h5", name)
                prep_times.append(time.perf_counter() - t0)
            from medclust.io.slice_store import read_case

            shape = read_case(out, slices=[0]).attrs["original_shape"]
            load_s, prep_s = statistics.median(load_times), statistics.median(prep_times)
            rss = 0.0
            if memory:
                code = (
                    f"{imports}\nfrom medclust.io.sources import CaseEntry\n"
                    f"from medclust.preprocess.pipeline import preprocess_case\n"
                    f"preprocess_case(CaseEntry.from_dict({case.to_dict()!r}), {prep!r}, {str(Path(tmp) / 'm.h5')!r}, {name!r})"
                )
                rss = _peak_rss_mb(code) - base_rss
            rows.append(
                {"dataset": name, "case": case.case_id, "shape": "x".join(map(str, shape)), "label": bool(case.label),
                 "load_s": load_s, "prep_s": prep_s, "ratio": prep_s / load_s, "rss_mb": rss}
            )
            print(f"  {name}/{case.case_id}: load {load_s:.3f} s, preprocess {prep_s:.3f} s, ratio {prep_s / load_s:.2f}", file=sys.stderr)
    return rows


def bench_workflow(cores_list: list[int]) -> list[tuple[int, float, float, int]]:
    """(cores, wall s, CPU s of all jobs, jobs) per run; CPU time is what contention does not inflate."""
    import resource

    results = []
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
            done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, encoding="utf-8", errors="replace")
            wall = time.perf_counter() - t0
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
            if done.returncode != 0:
                print(done.stdout[-3000:], done.stderr[-3000:], file=sys.stderr)
                sys.exit(f"snakemake --cores {cores} data failed")
            jobs = len(list((Path(tmp) / "results" / "logs").rglob("*.log")))
            results.append((cores, wall, cpu, jobs))
            print(f"  snakemake --cores {cores} data: {wall:.1f} s wall, {cpu:.1f} s CPU ({jobs} jobs)", file=sys.stderr)
    return results


def _print_cases(rows: list[dict], repeats: int) -> None:
    print("\nPreprocessing vs plain load+decompress (median of %d, one thread)" % repeats)
    header = f"{'dataset/case':38s} {'shape':>13s} {'label':>5s} {'load s':>7s} {'prep s':>7s} {'ratio':>6s} {'+RSS MB':>8s}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['dataset'] + '/' + r['case']:38s} {r['shape']:>13s} {'yes' if r['label'] else 'no':>5s} "
            f"{r['load_s']:7.3f} {r['prep_s']:7.3f} {r['ratio']:6.2f} {r['rss_mb']:8.0f}"
        )
    volumes = [r for r in rows if r["shape"].count("x") == 2]
    if volumes:
        print(f"worst 3D ratio: {max(r['ratio'] for r in volumes):.2f} (target <= 1.5)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timings per case (median reported)")
    parser.add_argument("--skip-workflow", action="store_true", help="skip the snakemake wall-time runs")
    parser.add_argument("--skip-memory", action="store_true", help="skip the per-case peak-memory processes")
    parser.add_argument("--skip-cases", action="store_true", help="only time the workflow")
    args = parser.parse_args()

    print(f"host: {os.uname().nodename}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    rows = [] if args.skip_cases else bench_cases(args.repeats, memory=not args.skip_memory)
    if rows:
        _print_cases(rows, args.repeats)
    if not args.skip_workflow:
        print("\nWhole data stage on the default config (fresh results_dir, demo data already fetched)")
        print(f"load average before: {os.getloadavg()[0]:.1f}")
        walls = bench_workflow([1, 2])
        print(f"{'cores':>5s} {'wall s':>8s} {'CPU s':>8s} {'jobs':>5s}")
        for cores, wall, cpu, jobs in walls:
            print(f"{cores:5d} {wall:8.1f} {cpu:8.1f} {jobs:5d}")
        if len(walls) == 2:
            print(f"speed-up 2 cores vs 1: {walls[0][1] / walls[1][1]:.2f}x")
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()

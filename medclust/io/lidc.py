"""LIDC-IDRI reader annotations (the XML that comes with each LIDC CT) -> a nodule table.

Each LIDC case has up to four blinded-then-unblinded radiologist reads. A read lists
``unblindedReadNodule`` elements: nodules >= 3 mm are outlined slice by slice (``roi`` with
``edgeMap`` pixel points, ``inclusion`` TRUE for the nodule, FALSE for holes cut out of it) and
rated (``characteristics``: malignancy 1-5 and others); nodules < 3 mm are a single point and
are not rated. ``nonNodule`` marks (other lesions >= 3 mm) are not nodules and are ignored.

This module

1. parses the XML into :class:`ReaderAnnotation` objects in pixel coordinates
   (:func:`parse_lidc_xml`);
2. measures each one in world coordinates with the CT series geometry
   (:class:`SeriesGeometry`, :func:`measure_annotation`): the outline is filled on each slice
   (outline pixels included, exclusion outlines removed), the centroid is the mean world
   position of those voxels, reported in **RAS** mm (DICOM is LPS: x and y are negated);
   ``diameter_mm`` is the greatest in-plane (axial) extent of any inclusion outline, i.e. the
   largest distance between two outline points on one slice (the LIDC/pylidc convention of
   "greatest axial diameter"); the equivalent-sphere diameter of the filled voxels is kept as
   ``sphere_diameter_mm`` for reference;
3. groups the readers' annotations into nodules (:func:`cluster_annotations`): two annotations
   belong to the same nodule when their centres are closer than
   ``max(radius_fraction * larger diameter, link_mm)`` (single linkage);
4. writes ``nodules.tsv`` (:func:`write_nodules_tsv`).

Nodules that every reader marked as < 3 mm are kept and flagged ``small``; their
``diameter_mm`` is the 3 mm upper bound of that LIDC category, not a measurement.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medclust.errors import BadInputError, MedclustError
from medclust.io.atomic import atomic_path

log = logging.getLogger(__name__)

LIDC_NAMESPACE = "http://www.nih.gov"
SMALL_NODULE_DIAMETER_MM = 3.0
NODULE_COLUMNS = (
    "nodule_id",
    "case_id",
    "x_mm",
    "y_mm",
    "z_mm",
    "diameter_mm",
    "n_readers",
    "malignancy_mean",
    "small",
)


@dataclass(frozen=True)
class RoiOutline:
    """One outline of one annotation on one CT slice, in pixel coordinates.

    Attributes:
        z_position: ``imageZposition`` (mm, equals the slice's ImagePositionPatient z).
        sop_uid: ``imageSOP_UID`` of the slice, if given.
        inclusion: True for nodule tissue, False for a hole cut out of it.
        points: (K, 2) array of (x = column, y = row) pixel indices of the outline.
    """

    z_position: float
    sop_uid: str | None
    inclusion: bool
    points: np.ndarray


@dataclass(frozen=True)
class ReaderAnnotation:
    """One reader's mark of one nodule.

    Attributes:
        reader_id: ``servicingRadiologistID`` (or ``session<k>`` when missing).
        nodule_id: the reader's own ``noduleID``.
        rois: the outlines (one point for a nodule < 3 mm).
        characteristics: ratings by name (``malignancy``, ``subtlety``, ...), empty if unrated.
    """

    reader_id: str
    nodule_id: str
    rois: tuple[RoiOutline, ...]
    characteristics: dict[str, int] = field(default_factory=dict)

    @property
    def small(self) -> bool:
        """LIDC marks nodules < 3 mm by a single point (one ROI with one edge point)."""
        included = [r for r in self.rois if r.inclusion]
        return len(included) == 1 and len(included[0].points) == 1


@dataclass(frozen=True)
class MeasuredAnnotation:
    """A :class:`ReaderAnnotation` measured in world coordinates.

    Attributes:
        annotation: the parsed annotation.
        centre_ras: centroid (x, y, z) in RAS mm.
        diameter_mm: greatest in-plane extent of the outlines (0 for a single point).
        sphere_diameter_mm: diameter of the sphere with the filled voxels' volume.
        volume_mm3: filled voxel count times the voxel volume.
    """

    annotation: ReaderAnnotation
    centre_ras: tuple[float, float, float]
    diameter_mm: float
    sphere_diameter_mm: float
    volume_mm3: float

    @property
    def small(self) -> bool:
        """True for a nodule the reader marked as < 3 mm."""
        return self.annotation.small


@dataclass(frozen=True)
class Nodule:
    """Readers' annotations grouped into one nodule (one row of ``nodules.tsv``)."""

    nodule_id: int
    case_id: str
    centre_ras: tuple[float, float, float]
    diameter_mm: float
    n_readers: int
    malignancy_mean: float
    small: bool
    members: tuple[MeasuredAnnotation, ...]

    def row(self) -> dict[str, object]:
        """The ``nodules.tsv`` row (numbers rounded to 0.01 mm / 0.01)."""
        x, y, z = self.centre_ras
        return {
            "nodule_id": self.nodule_id,
            "case_id": self.case_id,
            "x_mm": f"{x:.2f}",
            "y_mm": f"{y:.2f}",
            "z_mm": f"{z:.2f}",
            "diameter_mm": f"{self.diameter_mm:.2f}",
            "n_readers": self.n_readers,
            "malignancy_mean": "" if math.isnan(self.malignancy_mean) else f"{self.malignancy_mean:.2f}",
            "small": str(self.small).lower(),
        }


# --- parsing ----------------------------------------------------------------------------------


def _local(tag: str) -> str:
    # Tags come as "{namespace}name"; older LIDC files use other or no namespaces.
    return tag.rsplit("}", 1)[-1]


def _children(node: ET.Element, name: str) -> list[ET.Element]:
    return [child for child in node if _local(child.tag) == name]


def _text(node: ET.Element, name: str) -> str | None:
    found = _children(node, name)
    if not found or found[0].text is None:
        return None
    return found[0].text.strip()


def parse_lidc_xml(path: str | os.PathLike[str]) -> list[ReaderAnnotation]:
    """Parse an LIDC ``LidcReadMessage`` XML file into reader annotations.

    Args:
        path: the XML file (namespace ``http://www.nih.gov``).

    Returns:
        One :class:`ReaderAnnotation` per ``unblindedReadNodule`` that has at least one ROI, in
        file order. ``nonNodule`` marks are skipped.

    Raises:
        BadInputError: unreadable XML or an ROI without usable coordinates.
    """
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as err:
        raise BadInputError(path, f"cannot parse LIDC XML: {err}") from err
    annotations: list[ReaderAnnotation] = []
    sessions = [node for node in root.iter() if _local(node.tag) == "readingSession"]
    for k, session in enumerate(sessions):
        reader = _text(session, "servicingRadiologistID") or f"session{k}"
        for nodule in _children(session, "unblindedReadNodule"):
            nodule_id = _text(nodule, "noduleID") or f"{reader}-{len(annotations)}"
            rois = tuple(_parse_roi(path, nodule_id, roi) for roi in _children(nodule, "roi"))
            if not rois:
                continue
            ratings: dict[str, int] = {}
            for block in _children(nodule, "characteristics"):
                for item in block:
                    if item.text and item.text.strip():
                        try:
                            ratings[_local(item.tag)] = int(float(item.text))
                        except ValueError:
                            log.warning("%s: nodule %s: ignoring rating %s=%r", path, nodule_id, _local(item.tag), item.text)
            annotations.append(ReaderAnnotation(reader, nodule_id, rois, ratings))
    return annotations


def _parse_roi(path: str | os.PathLike[str], nodule_id: str, roi: ET.Element) -> RoiOutline:
    z_text = _text(roi, "imageZposition")
    points = []
    for edge in _children(roi, "edgeMap"):
        x, y = _text(edge, "xCoord"), _text(edge, "yCoord")
        if x is None or y is None:
            raise BadInputError(path, f"nodule {nodule_id}: edgeMap without xCoord/yCoord")
        points.append((int(float(x)), int(float(y))))
    if z_text is None or not points:
        raise BadInputError(path, f"nodule {nodule_id}: roi without imageZposition or edgeMap")
    inclusion = (_text(roi, "inclusion") or "TRUE").upper() == "TRUE"
    return RoiOutline(float(z_text), _text(roi, "imageSOP_UID"), inclusion, np.asarray(points, dtype=np.int64))


# --- geometry ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class SeriesGeometry:
    """Where the pixels of a CT series are, in DICOM patient (LPS) coordinates.

    Attributes:
        positions: ImagePositionPatient (LPS mm) of each slice, keyed by SOPInstanceUID.
        row_cosine: direction of increasing column index (ImageOrientationPatient[:3]).
        col_cosine: direction of increasing row index (ImageOrientationPatient[3:]).
        pixel_spacing: (row spacing, column spacing) in mm, DICOM PixelSpacing order.
        slice_spacing: distance between neighbouring slices in mm.
    """

    positions: dict[str, tuple[float, float, float]]
    row_cosine: tuple[float, float, float] = (1.0, 0.0, 0.0)
    col_cosine: tuple[float, float, float] = (0.0, 1.0, 0.0)
    pixel_spacing: tuple[float, float] = (1.0, 1.0)
    slice_spacing: float = 1.0

    @classmethod
    def from_dicom_dir(cls, folder: str | os.PathLike[str]) -> SeriesGeometry:
        """Read the geometry of the single-series DICOM folder ``folder`` (headers only)."""
        import pydicom  # local: only this constructor needs it

        tags = ["SOPInstanceUID", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SeriesInstanceUID"]
        positions: dict[str, tuple[float, float, float]] = {}
        orientation = spacing = None
        series: set[str] = set()
        for file in sorted(Path(folder).iterdir()):
            if not file.is_file():
                continue
            try:
                ds = pydicom.dcmread(file, stop_before_pixels=True, specific_tags=tags)
            except Exception:  # noqa: BLE001 - any non-DICOM file in the folder is skipped
                continue
            if "ImagePositionPatient" not in ds or "SOPInstanceUID" not in ds:
                continue
            positions[str(ds.SOPInstanceUID)] = tuple(float(v) for v in ds.ImagePositionPatient)
            orientation = orientation or [float(v) for v in ds.ImageOrientationPatient]
            spacing = spacing or [float(v) for v in ds.PixelSpacing]
            series.add(str(ds.get("SeriesInstanceUID", "")))
        if not positions or orientation is None or spacing is None:
            raise BadInputError(folder, "no DICOM slices with ImagePositionPatient found")
        if len(series) > 1:
            raise BadInputError(folder, f"holds {len(series)} DICOM series; expected one")
        row, col = np.asarray(orientation[:3]), np.asarray(orientation[3:])
        normal = np.cross(row, col)
        offsets = sorted(float(np.dot(normal, p)) for p in positions.values())
        steps = np.diff(offsets)
        slice_spacing = float(np.median(steps)) if len(steps) else 1.0
        return cls(positions, tuple(row), tuple(col), (spacing[0], spacing[1]), slice_spacing)

    def slice_position(self, roi: RoiOutline, source: object = "<xml>") -> np.ndarray:
        """ImagePositionPatient of the slice an ROI lies on: by SOP UID, else by nearest z."""
        if roi.sop_uid and roi.sop_uid in self.positions:
            return np.asarray(self.positions[roi.sop_uid])
        z = np.array([p[2] for p in self.positions.values()])
        nearest = int(np.argmin(np.abs(z - roi.z_position)))
        if abs(z[nearest] - roi.z_position) > 0.5 * self.slice_spacing + 1e-3:
            raise BadInputError(source, f"ROI at z={roi.z_position} mm matches no slice of the series")
        return np.asarray(list(self.positions.values())[nearest])

    def to_lps(self, ipp: np.ndarray, xy: np.ndarray) -> np.ndarray:
        """LPS mm of pixel (x = column, y = row) points ``xy`` (N, 2) on the slice at ``ipp``."""
        xy = np.asarray(xy, dtype=np.float64)
        row, col = np.asarray(self.row_cosine), np.asarray(self.col_cosine)
        return ipp[None, :] + xy[:, :1] * self.pixel_spacing[1] * row + xy[:, 1:2] * self.pixel_spacing[0] * col


def lps_to_ras(points: np.ndarray) -> np.ndarray:
    """DICOM LPS -> NIfTI/RAS world coordinates (negate x and y)."""
    out = np.array(points, dtype=np.float64, copy=True)
    out[..., :2] *= -1.0
    return out


def _fill_outline(points: np.ndarray) -> np.ndarray:
    """Pixels (x, y) inside or on a closed outline, as an (N, 2) int array."""
    from matplotlib.path import Path as PolygonPath  # dependency already; fills without skimage

    lo, hi = points.min(axis=0), points.max(axis=0)
    xs, ys = np.meshgrid(np.arange(lo[0], hi[0] + 1), np.arange(lo[1], hi[1] + 1), indexing="xy")
    grid = np.column_stack([xs.ravel(), ys.ravel()])
    inside = np.zeros(len(grid), dtype=bool)
    if len(points) >= 3:
        inside = PolygonPath(points.astype(np.float64), closed=False).contains_points(grid)
    on_outline = set(map(tuple, points.tolist()))
    inside |= np.fromiter((tuple(p) in on_outline for p in grid.tolist()), dtype=bool, count=len(grid))
    return grid[inside]


def _max_extent(points_mm: np.ndarray) -> float:
    if len(points_mm) < 2:
        return 0.0
    diff = points_mm[:, None, :] - points_mm[None, :, :]
    return float(np.sqrt((diff**2).sum(-1)).max())


def measure_annotation(
    annotation: ReaderAnnotation, geometry: SeriesGeometry, source: object = "<xml>"
) -> MeasuredAnnotation:
    """Centroid (RAS mm), greatest axial diameter and volume of one reader annotation.

    Args:
        annotation: a parsed annotation.
        geometry: the geometry of the CT series the annotation refers to.
        source: the XML path, for error messages.

    Returns:
        The measured annotation (see the module docstring for the definitions).
    """
    voxels_lps: list[np.ndarray] = []
    diameter = 0.0
    by_slice: dict[float, list[RoiOutline]] = {}
    for roi in annotation.rois:
        by_slice.setdefault(round(roi.z_position, 3), []).append(roi)
    for rois in by_slice.values():
        ipp = geometry.slice_position(rois[0], source)
        included: set[tuple[int, int]] = set()
        for roi in rois:
            if roi.inclusion:
                included |= set(map(tuple, _fill_outline(roi.points).tolist()))
                diameter = max(diameter, _max_extent(geometry.to_lps(ipp, roi.points)))
        for roi in rois:
            if not roi.inclusion:
                hole = set(map(tuple, _fill_outline(roi.points).tolist()))
                # The hole's outline itself stays nodule tissue, as the inclusion outline does.
                included -= hole - set(map(tuple, roi.points.tolist()))
        if included:
            voxels_lps.append(geometry.to_lps(ipp, np.array(sorted(included))))
    if not voxels_lps:
        raise BadInputError(source, f"nodule {annotation.nodule_id} of reader {annotation.reader_id}: empty outline")
    all_lps = np.concatenate(voxels_lps)
    centre = lps_to_ras(all_lps.mean(axis=0))
    voxel_volume = geometry.pixel_spacing[0] * geometry.pixel_spacing[1] * geometry.slice_spacing
    volume = len(all_lps) * voxel_volume
    sphere = (6.0 * volume / math.pi) ** (1.0 / 3.0)
    return MeasuredAnnotation(annotation, (float(centre[0]), float(centre[1]), float(centre[2])), diameter, sphere, volume)


# --- grouping readers' marks into nodules -----------------------------------------------------


def cluster_annotations(
    measured: Sequence[MeasuredAnnotation],
    case_id: str,
    link_mm: float = 5.0,
    radius_fraction: float = 0.5,
) -> list[Nodule]:
    """Group annotations of different readers that mark the same nodule.

    Single linkage: annotations ``a`` and ``b`` are linked when
    ``|c_a - c_b| <= max(radius_fraction * max(d_a, d_b), link_mm)``, with ``d`` the greatest
    axial diameter (3 mm for a < 3 mm point mark).

    Args:
        measured: annotations of all readers of one case.
        case_id: written into every row.
        link_mm: the smallest linking distance, for small nodules whose single point marks
            differ by a few millimetres between readers.
        radius_fraction: fraction of the larger diameter that still counts as the same nodule.

    Returns:
        Nodules sorted from superior to inferior (then right to left), numbered from 1.
        Centre = mean of the readers' centres; diameter = mean over readers that outlined it
        (3 mm when every reader marked it < 3 mm); malignancy = mean of the readers' ratings
        (NaN when unrated).
    """
    n = len(measured)
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    sizes = [SMALL_NODULE_DIAMETER_MM if m.small else m.diameter_mm for m in measured]
    centres = np.array([m.centre_ras for m in measured]).reshape(n, 3)
    for i in range(n):
        for j in range(i + 1, n):
            limit = max(radius_fraction * max(sizes[i], sizes[j]), link_mm)
            if np.linalg.norm(centres[i] - centres[j]) <= limit:
                parent[find(i)] = find(j)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(find(i), []).append(i)

    drafts = []
    for members in groups.values():
        marks = [measured[i] for i in members]
        readers = [m.annotation.reader_id for m in marks]
        if len(set(readers)) < len(readers):
            log.warning("%s: one reader has several marks in one nodule near %s", case_id, np.round(centres[members[0]], 1))
        outlined = [m.diameter_mm for m in marks if not m.small]
        ratings = [m.annotation.characteristics["malignancy"] for m in marks if "malignancy" in m.annotation.characteristics]
        centre = centres[members].mean(axis=0)
        drafts.append(
            (
                tuple(float(v) for v in centre),
                float(np.mean(outlined)) if outlined else SMALL_NODULE_DIAMETER_MM,
                len(set(readers)),
                float(np.mean(ratings)) if ratings else float("nan"),
                not outlined,
                tuple(marks),
            )
        )
    drafts.sort(key=lambda d: (-d[0][2], -d[0][0]))
    return [Nodule(k + 1, case_id, *draft) for k, draft in enumerate(drafts)]


def lidc_nodules(
    xml_path: str | os.PathLike[str],
    dicom_dir: str | os.PathLike[str] | None = None,
    case_id: str = "case",
    geometry: SeriesGeometry | None = None,
    **cluster_kwargs: float,
) -> list[Nodule]:
    """Parse, measure and group the annotations of one LIDC case.

    Args:
        xml_path: the LIDC XML.
        dicom_dir: the CT series folder the XML refers to (or give ``geometry``).
        case_id: the case id written into the table.
        geometry: a ready :class:`SeriesGeometry` instead of ``dicom_dir``.
        **cluster_kwargs: ``link_mm`` / ``radius_fraction`` for :func:`cluster_annotations`.

    Returns:
        The nodules of the case.
    """
    if geometry is None:
        if dicom_dir is None:
            raise MedclustError(f"{xml_path}: need the DICOM series folder (or a geometry) to place the nodules")
        geometry = SeriesGeometry.from_dicom_dir(dicom_dir)
    annotations = parse_lidc_xml(xml_path)
    measured = [measure_annotation(a, geometry, xml_path) for a in annotations]
    nodules = cluster_annotations(measured, case_id, **cluster_kwargs)
    log.info(
        "%s: %d reader annotations from %d readers -> %d nodules (%d small)",
        xml_path,
        len(measured),
        len({a.reader_id for a in annotations}),
        len(nodules),
        sum(n.small for n in nodules),
    )
    return nodules


def write_nodules_tsv(nodules: Iterable[Nodule], path: str | os.PathLike[str]) -> Path:
    """Write ``nodules.tsv`` atomically (columns :data:`NODULE_COLUMNS`, coordinates RAS mm)."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=NODULE_COLUMNS, delimiter="\t", lineterminator="\n")
            writer.writeheader()
            for nodule in nodules:
                writer.writerow(nodule.row())
    return Path(path)


def read_nodules_tsv(path: str | os.PathLike[str]) -> list[dict[str, object]]:
    """Read ``nodules.tsv`` back: numbers as float/int, ``small`` as bool."""
    rows: list[dict[str, object]] = []
    with open(path, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle, delimiter="\t"):
            parsed: dict[str, object] = dict(row)
            for key in ("x_mm", "y_mm", "z_mm", "diameter_mm", "malignancy_mean"):
                parsed[key] = float(row[key]) if row.get(key) else float("nan")
            parsed["n_readers"] = int(row["n_readers"])
            parsed["nodule_id"] = int(row["nodule_id"])
            parsed["small"] = str(row.get("small", "false")).lower() == "true"
            rows.append(parsed)
    return rows

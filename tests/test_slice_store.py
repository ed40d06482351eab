"""HDF5 slice store: contents, attribute types, partial reads, and atomic writes (no partial file)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import h5py
import numpy as np
import pytest

from medclust.errors import MedclustError
from medclust.io import slice_store
from medclust.io.slice_store import REQUIRED_ATTRS, read_attrs, read_case, write_case


def _attrs(num_slices: int) -> dict:
    return {
        "case_id": "c1",
        "dataset": "d",
        "modality": "CT",
        "simulated": False,
        "source_path": "/data/c1.nii.gz",
        "source_sha256": "0" * 64,
        "label_path": None,
        "original_shape": [10, 12, num_slices],
        "original_spacing": [0.5, 0.5, 2.0],
        "original_affine": np.diag([-0.5, -0.5, 2.0, 1.0]),
        "store_affine": np.diag([1.0, 1.0, 2.0, 1.0]),
        "target_spacing": [1.0, 1.0, 2.0],
        "slice_axis": 2,
        "z_positions_mm": [2.0 * k for k in range(num_slices)],
        "normalisation": {"method": "ct_window", "window_hu": [-1000, 1000]},
        "class_label": 1,
        "medclust_version": "0.1.0",
    }


def test_round_trip_dtypes_and_attrs(tmp_path):
    image = np.random.default_rng(0).random((4, 6, 5)).astype(np.float32)
    label = np.zeros((4, 6, 5), np.int64)
    label[1, 2, 3] = 7
    path = write_case(tmp_path / "c1.h5", image, _attrs(4), label=label, dtype="float16")
    with h5py.File(path) as handle:
        assert handle["image"].dtype == np.float16 and handle["image"].chunks == (1, 6, 5)
        assert handle["label"].dtype == np.uint8
    case = read_case(path)
    np.testing.assert_allclose(case.image, image, atol=1e-3)
    assert case.label[1, 2, 3] == 7 and case.num_slices == 4
    assert case.attrs["label_path"] == "" and case.attrs["simulated"] is False
    assert np.asarray(case.attrs["original_affine"]).shape == (4, 4)
    assert case.normalisation == {"method": "ct_window", "window_hu": [-1000, 1000]}
    np.testing.assert_allclose(case.z_mm, [0, 2, 4, 6])
    assert set(REQUIRED_ATTRS) <= set(read_attrs(path))
    part = read_case(path, slices=[1, 3], load_label=False)
    assert part.image.shape == (2, 6, 5) and part.label is None
    np.testing.assert_allclose(part.z_mm, [2, 6])


def test_wide_labels_are_int16_and_bad_shapes_rejected(tmp_path):
    image = np.zeros((2, 3, 3), np.float32)
    label = np.full((2, 3, 3), 3001, np.int32)
    write_case(tmp_path / "w.h5", image, _attrs(2), label=label)
    assert read_case(tmp_path / "w.h5").label.dtype == np.int16
    with pytest.raises(MedclustError, match="label shape"):
        write_case(tmp_path / "x.h5", image, _attrs(2), label=label[:1])
    attrs = _attrs(2)
    del attrs["store_affine"]
    with pytest.raises(MedclustError, match="store_affine"):
        write_case(tmp_path / "y.h5", image, attrs)
    assert not (tmp_path / "x.h5").exists() and not (tmp_path / "y.h5").exists()


def test_exception_mid_write_leaves_no_file(tmp_path, monkeypatch):
    def explode(handle, attrs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(slice_store, "_write_attrs", explode)
    with pytest.raises(RuntimeError, match="disk full"):
        write_case(tmp_path / "c1.h5", np.zeros((2, 4, 4)), _attrs(2))
    assert list(tmp_path.iterdir()) == []  # neither the case nor a temporary file


def test_sigkill_mid_write_leaves_no_case_file(tmp_path):
    marker = tmp_path / "writing"
    script = textwrap.dedent(
        f"""
        import time, numpy as np
        from pathlib import Path
        from medclust.io import slice_store

        original = slice_store._write_attrs
        def slow(handle, attrs):
            original(handle, attrs)
            handle.flush()
            Path({str(marker)!r}).write_text("x", encoding="utf-8")
            time.sleep(60)
        slice_store._write_attrs = slow
        import json
        attrs = json.loads({json.dumps({k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in _attrs(3).items()})!r})
        slice_store.write_case({str(tmp_path / "c1.h5")!r}, np.ones((3, 8, 8)), attrs, label=np.ones((3, 8, 8), int))
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert proc.poll() is None, "writer exited before reaching the middle of the write"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "c1.h5").exists()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "writing"]
    assert all(name.startswith(".c1.h5.") and name.endswith(".tmp") for name in leftovers)

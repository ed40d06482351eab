"""Fixed manifest splits within a group: one patient can never be in two splits."""

from __future__ import annotations

import json

import numpy as np
import pytest

from finetune_helpers import write_store
from medclust.cli import main
from medclust.errors import BadInputError
from medclust.io.sources import read_manifest
from medclust.preprocess.index import make_splits


def _manifest(tmp_path, rows: str):
    for name in ("a", "b", "c", "d"):
        (tmp_path / f"{name}.nii.gz").write_bytes(b"")
    path = tmp_path / "cases.csv"
    path.write_text("image,patient_id,split\n" + rows, encoding="utf-8")
    return path


def test_conflicting_fixed_splits_in_one_group_stop_naming_group_and_manifest(tmp_path):
    manifest = _manifest(tmp_path, "a.nii.gz,P7,train\nb.nii.gz,P7,test\nc.nii.gz,P8,\nd.nii.gz,P9,\n")
    entries = read_manifest(manifest, modality="CT")
    with pytest.raises(BadInputError) as caught:
        make_splits("d", entries, seed=0, val_fraction=0.2, test_fraction=0.2, source=manifest)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(str(manifest))
    assert "'P7'" in message and "a=train" in message and "b=test" in message


def test_a_group_follows_its_one_fixed_split(tmp_path):
    manifest = _manifest(tmp_path, "a.nii.gz,P7,test\nb.nii.gz,P7,\nc.nii.gz,P7,test\nd.nii.gz,P9,\n")
    splits = make_splits("d", read_manifest(manifest, modality="CT"), seed=0, val_fraction=0.2, test_fraction=0.2)
    assert splits["test"] == ["a", "b", "c"] and splits["train"] == ["d"]


def test_cli_index_names_the_manifest(tmp_path, capsys):
    manifest = _manifest(tmp_path, "a.nii.gz,P7,val\nb.nii.gz,P7,test\n")
    entries = read_manifest(manifest, modality="CT")
    image = np.zeros((2, 8, 8), np.float32)
    store = write_store(tmp_path / "slices", "d", [{"case_id": e.case_id, "image": image} for e in entries])
    cases = tmp_path / "cases.json"
    cases.write_text(json.dumps({"dataset": "d", "cases": [e.to_dict() for e in entries]}), encoding="utf-8")
    settings = json.dumps({"dataset": "d", "seed": 0, "source": str(manifest)})
    splits = tmp_path / "out" / "splits.json"
    code = main(["index", "--settings", settings, "--cases", str(cases), "--slices-dir", str(store),
                 "--index", str(tmp_path / "out" / "index.json"), "--splits", str(splits)])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert str(manifest) in err and "'P7'" in err
    assert not splits.exists()  # nothing half-written

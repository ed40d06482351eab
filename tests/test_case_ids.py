"""Case ids from names that differ only in non-ASCII characters stay unique and stable: no case is
dropped as a "duplicate" of another patient."""

from __future__ import annotations

import json

import numpy as np
from data_helpers import phantom_ct, save_nifti

from medclust.io.sources import CaseEntry, make_case_ids_unique, name_hash, sanitize_case_id
from medclust.preprocess.ingest import ingest_dataset

NAMES = ["Muller", "Müller", "Möller", "病例一", "病例二", "LIDC IDRI 1"]


def test_transliteration_and_hash_suffix_only_where_names_collide():
    assert [sanitize_case_id(n) for n in NAMES] == ["Muller", "Muller", "Moller", "case", "case", "LIDC_IDRI_1"]
    entries = [CaseEntry(case_id=sanitize_case_id(n), image=f"{n}.nii.gz", source_name=n) for n in NAMES]
    make_case_ids_unique(entries)
    assert [e.case_id for e in entries] == [
        "Muller",  # already exactly its own name: kept
        f"Muller_{name_hash('Müller')}",
        "Moller",  # transliterated, no collision: no suffix
        f"case_{name_hash('病例一')}",
        f"case_{name_hash('病例二')}",
        "LIDC_IDRI_1",
    ]
    assert len({e.case_id for e in entries}) == len(NAMES)
    # stable: the same names in another order get the same ids
    shuffled = [CaseEntry(case_id=sanitize_case_id(n), image=n, source_name=n) for n in reversed(NAMES)]
    make_case_ids_unique(shuffled)
    assert [e.case_id for e in reversed(shuffled)] == [e.case_id for e in entries]
    # one name spelt in NFD (as macOS file names are) is the same name, so still a duplicate
    nfd = "Mu\u0308ller"
    twins = [CaseEntry(case_id="Muller", image="a", source_name="Müller"), CaseEntry(case_id="Muller", image="b", source_name=nfd)]
    make_case_ids_unique(twins)
    assert [e.case_id for e in twins] == ["Muller", "Muller"]


def test_ingest_keeps_every_case_of_a_manifest_with_non_ascii_names(tmp_path):
    data = tmp_path / "data"
    rows = ["case_id\timage\tmodality"]
    for k, name in enumerate(NAMES):
        save_nifti(data / f"scan{k}.nii.gz", phantom_ct((8, 8, 3), seed=k), np.eye(4))
        rows.append(f"{name}\tscan{k}.nii.gz\tCT")
    (data / "list.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    settings = {"name": "names", "format": "manifest", "path": str(data / "list.tsv"), "on_bad_input": "fail"}
    records = ingest_dataset(settings, tmp_path / "qc.tsv", tmp_path / "cases.json")
    assert [r.status for r in records] == ["ok"] * len(NAMES)
    cases = json.loads((tmp_path / "cases.json").read_text(encoding="utf-8"))["cases"]
    assert [c["image"] for c in cases] == [str(data / f"scan{k}.nii.gz") for k in range(len(NAMES))]
    assert len({c["case_id"] for c in cases}) == len(NAMES)
    assert cases[1]["case_id"] == f"Muller_{name_hash('Müller')}" and cases[3]["case_id"].startswith("case_")


def test_non_ascii_file_names_in_an_image_folder(tmp_path):
    from PIL import Image

    folder = tmp_path / "xr"
    folder.mkdir()
    for k, name in enumerate(["胸部一", "胸部二", "Röntgen_ä", "Röntgen_ö"]):
        Image.fromarray(np.full((20, 16), 40 * k + 10, np.uint8) + np.arange(16, dtype=np.uint8)).save(folder / f"{name}.png")
    settings = {"name": "xr", "format": "images", "path": str(folder), "on_bad_input": "fail"}
    records = ingest_dataset(settings, tmp_path / "qc.tsv", tmp_path / "cases.json")
    ids = sorted(r.entry.case_id for r in records)
    assert [r.status for r in records] == ["ok"] * 4
    assert ids == sorted(["Rontgen_a", "Rontgen_o", f"case_{name_hash('胸部一')}", f"case_{name_hash('胸部二')}"])

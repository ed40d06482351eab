"""Model packages, `medclust predict` on new images (own grid, every input kind) and MONAI bundles."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medclust.cli import main
from medclust.errors import BadInputError
from medclust.io.readers import load_image
from medclust.io.slice_store import read_attrs
from medclust.predict import load_package, predict_inputs, write_package, write_pretrain_package
from medclust.predict.bundle import export_bundle
from medclust.train.recipes.finetune import run_finetune
from predict_helpers import (
    SEG_SETTINGS,
    ct_volume,
    make_training_store,
    ras_affine,
    varied_package,
    write_dicom_series,
    write_itk,
    write_nifti,
)


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory):
    """A tiny segmentation run (2.5D, nnU-Net CT normalisation) trained on a real slice store."""
    root = tmp_path_factory.mktemp("predict")
    store = make_training_store(root)
    run = root / "run"
    run_finetune(SEG_SETTINGS, store, run, "none", 1.0, 0)
    return {"root": root, "store": store, "run": run}


@pytest.fixture(scope="module")
def new_scans(seg_run):
    """One oblique volume (int16 HU) written as NIfTI, NRRD and a DICOM series, and a 2D PNG."""
    from PIL import Image

    folder = seg_run["root"] / "new"
    folder.mkdir(exist_ok=True)
    hu, _ = ct_volume(shape=(26, 20, 9), seed=7)
    affine = ras_affine(spacing=(1.7, 1.9, 3.5), angles_deg=(8.0, -6.0, 15.0), origin=(-20.0, -15.0, -12.0))
    png = folder / "xray.png"
    yy, xx = np.mgrid[:30, :40]
    Image.fromarray((60 + 120 * ((yy - 15) ** 2 + (xx - 22) ** 2 < 60)).astype(np.uint8)).save(png)
    return {
        "nifti": write_nifti(folder / "oblique.nii.gz", hu, affine),
        "nrrd": write_itk(folder / "oblique.nrrd", hu, affine),
        "dicom": write_dicom_series(folder / "series", hu, affine),
        "png": png,
        "affine": affine,
    }


@pytest.fixture(scope="module")
def varied(seg_run, new_scans):
    """The run's package with a head whose labels follow the image."""
    return varied_package(seg_run["run"], seg_run["root"] / "varied", new_scans["nifti"])


# -- the package -----------------------------------------------------------------------------------


def test_package_records_what_the_model_needs(seg_run):
    run, store = seg_run["run"], seg_run["store"]
    meta = json.loads((run / "model.json").read_text(encoding="utf-8"))
    assert meta["format"] == "medclust-model" and meta["format_version"] == 1
    assert meta["task"]["type"] == "segmentation" and meta["task"]["name"] == "toy_organs"
    assert meta["network"]["context_slices"] == 1 and meta["network"]["in_channels"] == 3
    assert meta["network"]["backbone"] == "resnet10" and meta["network"]["num_outputs"] == 3
    assert meta["classes"] == {"0": "background", "1": "class_1", "2": "class_2"}
    # preprocessing exactly as the training store recorded it, not re-typed from the config
    prep = meta["preprocessing"]["toy"]
    attrs = read_attrs(store / "case0.h5")
    assert prep["settings"] == json.loads(attrs["preprocess"])
    per_image = {"antialias_block"}  # measured on each image, recomputed on each input
    assert prep["normalisation"]["CT"] == {k: v for k, v in json.loads(attrs["normalisation"]).items() if k not in per_image}
    assert prep["normalisation"]["CT"]["method"] == "nnunet"
    assert prep["intensity"]["intensity.json"]["mean"] == prep["normalisation"]["CT"]["mean"]
    assert prep["store_dtype"] == "float16" and prep["modalities"] == ["CT"]
    assert meta["training"]["train_cases"] == ["case0", "case1"] and meta["training"]["init"] == "none"
    assert meta["metrics"]["primary_metric"] in meta["metrics"]["values"]
    # the weights load strictly into the rebuilt network and equal the run's selected model
    package = load_package(run)
    model = package.build_model()
    saved = torch.load(run / "model.pt", weights_only=True)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, saved[key])


def test_package_round_trip_and_checks(tmp_path, seg_run):
    package = load_package(seg_run["run"] / "model.json")
    state = package.load_state_dict()
    meta = {k: v for k, v in package.meta.items() if k not in ("format", "format_version", "weights")}
    copy = tmp_path / "copy"
    write_package(copy, meta, state, "weights.pt")
    again = load_package(copy)
    assert again.meta["weights"]["file"] == "weights.pt"
    assert {k: again.meta[k] for k in meta} == json.loads(json.dumps(meta))
    for key, value in again.load_state_dict().items():
        torch.testing.assert_close(value, state[key])
    # a replaced weights file is refused by its checksum, naming the file
    torch.save({"x": torch.zeros(1)}, copy / "weights.pt")
    with pytest.raises(BadInputError, match=r"weights\.pt: weights do not match model\.json"):
        again.load_state_dict()
    # weights are loaded with weights_only=True: a pickled object is refused even with a matching checksum
    torch.save({"x": torch.zeros(1), "evil": Path("x")}, copy / "weights.pt")
    import hashlib

    record = json.loads((copy / "model.json").read_text(encoding="utf-8"))
    record["weights"]["sha256"] = hashlib.sha256((copy / "weights.pt").read_bytes()).hexdigest()
    (copy / "model.json").write_text(json.dumps(record), encoding="utf-8")
    with pytest.raises(BadInputError, match="cannot load model weights"):
        load_package(copy).load_state_dict()
    with pytest.raises(BadInputError, match="no model.json"):
        load_package(tmp_path)


# -- predict ----------------------------------------------------------------------------------------


def test_predict_gives_the_runs_own_test_labels(tmp_path, seg_run):
    """The run scored case3 from its slice store; predict re-reads the source NIfTI: same labels."""
    run = seg_run["run"]
    summary = predict_inputs(run, [seg_run["root"] / "sources" / "case3.nii.gz"], tmp_path, progress=False)
    assert summary["n_ok"] == 1 and summary["inputs"][0]["modality"] == "CT"
    mine = nib.load(tmp_path / "case3.nii.gz")
    theirs = nib.load(run / "predictions" / "case3.nii.gz")
    np.testing.assert_array_equal(np.asarray(mine.dataobj), np.asarray(theirs.dataobj))
    np.testing.assert_allclose(mine.affine, theirs.affine)


def test_predict_sees_exactly_the_training_input(seg_run):
    """Preprocessing a source anew gives the stored slices bit for bit, and the same network outputs."""
    from medclust.evaluate.predict import predict_logits
    from medclust.io.slice_store import read_case
    from medclust.io.sources import CaseEntry
    from medclust.predict import Predictor

    predictor = Predictor(seg_run["run"], device="cpu")
    prepared = predictor.prepare(CaseEntry("case3", str(seg_run["root"] / "sources" / "case3.nii.gz")))
    stored = np.asarray(read_case(seg_run["store"] / "case3.h5").image, dtype=np.float32)
    np.testing.assert_array_equal(prepared.slices, stored)
    ours = predictor.logits(prepared)
    theirs = predict_logits(predictor.model, stored, np.arange(stored.shape[0]), context_slices=1, batch_size=4)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert float(ours.std()) > 0  # a real, non-constant output


def test_predict_on_each_inputs_own_grid(tmp_path, varied, new_scans):
    out = tmp_path / "out"
    inputs = [new_scans["nifti"], new_scans["nrrd"], new_scans["dicom"], new_scans["png"]]
    summary = predict_inputs(varied, inputs, out, progress=False)
    assert summary["n_ok"] == 4, summary
    names = {r["case_id"]: r for r in summary["inputs"]}
    assert set(names) == {"oblique", "oblique_2", "series", "xray"}
    maps = {}
    for case_id, source in zip(["oblique", "oblique_2", "series", "xray"], inputs):
        original = load_image(source)
        written = nib.load(out / f"{case_id}.nii.gz")
        assert written.shape == original.shape, case_id
        np.testing.assert_allclose(written.affine, original.affine, atol=1e-4)
        assert nib.aff2axcodes(written.affine) == nib.aff2axcodes(original.affine)
        maps[case_id] = np.asarray(written.dataobj)
    # an oblique grid is not a resampled one: the NIfTI keeps the input's own (rotated) affine
    np.testing.assert_allclose(nib.load(out / "oblique.nii.gz").affine, new_scans["affine"], atol=1e-6)
    # the same volume in three formats: the same labels (the headers round the geometry
    # differently in the last digits, which may move a voxel on a class boundary)
    assert len(np.unique(maps["oblique"])) >= 2  # labels follow the image
    assert (maps["oblique"] == maps["oblique_2"]).mean() > 0.999
    assert (maps["oblique"] == maps["series"]).mean() > 0.999
    assert maps["xray"].ndim == 2
    assert (out / "predict.json").is_file() and (out / "provenance.json").is_file()
    assert not list(out.glob(".*.tmp"))


def test_dicom_seg_references_every_slice(tmp_path, varied, new_scans):
    import highdicom as hd
    import pydicom

    out = tmp_path / "out"
    predict_inputs(varied, [new_scans["dicom"]], out, dicom_seg=True, progress=False)
    labels = np.asarray(nib.load(out / "series.nii.gz").dataobj)
    assert any((labels[..., z] != labels[..., 0]).any() for z in range(labels.shape[2]))  # slices differ
    seg = hd.seg.segread(out / "series.seg.dcm")
    assert seg.Modality == "SEG"
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["class_1", "class_2"]
    sources = [pydicom.dcmread(p) for p in sorted(Path(new_scans["dicom"]).glob("*.dcm"))]
    image = load_image(new_scans["dicom"])
    inverse = np.linalg.inv(image.affine)
    uids = [ds.SOPInstanceUID for ds in sources]
    masks = seg.get_pixels_by_source_instance(uids, combine_segments=True, skip_overlap_checks=True)
    for ds, mask in zip(sources, masks):
        k = int(np.rint((inverse[:3, :3] @ (np.diag([-1, -1, 1]) @ np.asarray(ds.ImagePositionPatient, float)) + inverse[:3, 3])[2]))
        expected = labels[:, :, k].T
        np.testing.assert_array_equal(np.asarray(mask), np.where(expected > 0, expected, 0))


def test_dicom_seg_of_a_one_slice_series(tmp_path):
    """A one-slice series is read as a 2D image: its 2D label map used to crash (labels.shape[2])."""
    from types import SimpleNamespace

    import highdicom as hd

    from medclust.predict.dicom_seg import write_dicom_seg

    hu, truth = ct_volume(shape=(20, 16, 3), seed=3)
    folder = write_dicom_series(tmp_path / "one", hu[..., 1:2], ras_affine(angles_deg=(0.0, 0.0, 10.0)))
    image = load_image(folder)
    labels = truth[..., 1]
    assert image.array.ndim == 2 and labels.shape == image.shape
    out = write_dicom_seg(tmp_path / "one.seg.dcm", labels, image, {0: "bg", 1: "disc", 2: "block"}, SimpleNamespace(name="toy"))
    seg = hd.seg.segread(out)
    (mask,) = seg.get_pixels_by_source_instance(
        [seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID],
        combine_segments=True, skip_overlap_checks=True,
    )
    np.testing.assert_array_equal(np.asarray(mask), labels.T)


def test_bad_inputs_skip_or_fail_with_one_line(tmp_path, seg_run, new_scans, caplog, capsys):
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"\x1f\x8b not really gzip")
    missing = tmp_path / "missing.nrrd"
    out = tmp_path / "skip"
    out.mkdir()
    (out / "broken.nii.gz").write_bytes(b"an earlier run's label map of this case")  # stale: must not survive
    (out / "oblique.seg.dcm").write_bytes(b"an earlier run's DICOM SEG")  # this run writes no SEG
    with caplog.at_level("WARNING", logger="medclust.predict"):
        summary = predict_inputs(seg_run["run"], [bad, new_scans["nifti"], missing], out, on_bad_input="skip", progress=False)
    skipped = [r for r in summary["inputs"] if r["status"] == "skipped"]
    assert [r["input"] for r in skipped] == [str(bad), str(missing)]
    assert skipped[0]["removed_stale"] == ["broken.nii.gz"] and not (out / "oblique.seg.dcm").exists()
    lines = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(lines) == 2 and str(bad) in lines[0] and str(missing) in lines[1] and "file not found" in lines[1]
    assert all("\n" not in line for line in lines)
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["oblique.nii.gz"]
    # fail: the first bad input stops the run with exit code 2 and one line naming it
    code = main(["predict", "--model", str(seg_run["run"]), "--input", str(bad), "--input", str(new_scans["nifti"]),
                 "--out", str(tmp_path / "fail"), "--on-bad-input", "fail", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith(f"medclust predict: error: {bad}:")
    assert not (tmp_path / "fail" / "oblique.nii.gz").exists()
    with pytest.raises(BadInputError, match="no input could be predicted"):
        predict_inputs(seg_run["run"], [missing], tmp_path / "none", progress=False)


def test_modality_mismatch_is_a_bad_input(tmp_path, seg_run, new_scans):
    series = tmp_path / "mr"
    shutil.copytree(new_scans["dicom"], series)
    import pydicom

    for path in series.glob("*.dcm"):
        ds = pydicom.dcmread(path)
        ds.Modality = "MR"
        ds.save_as(path)
    with pytest.raises(BadInputError, match=f"{series}: modality MR .* trained on CT"):
        predict_inputs(seg_run["run"], [series], tmp_path / "out", on_bad_input="fail", progress=False)
    # forcing the modality is the user's call
    summary = predict_inputs(seg_run["run"], [series], tmp_path / "forced", modality="CT", progress=False)
    assert summary["n_ok"] == 1 and summary["inputs"][0]["modality"] == "CT"


def test_classification_and_detection_packages(tmp_path, seg_run, new_scans):
    from medclust.models.heads import build_task_model

    base = load_package(seg_run["run"]).meta
    meta = {k: v for k, v in base.items() if k not in ("format", "format_version", "weights")}
    torch.manual_seed(0)
    cls = {**meta, "task": {"name": "toy_cls", "type": "classification", "level": "slice", "multilabel": False},
           "classes": {"0": "no disc", "1": "disc"}, "network": {**meta["network"], "num_outputs": 2, "head": "linear"}}
    write_package(tmp_path / "cls", cls, build_task_model("classification", 3, 2, "resnet10").state_dict())
    summary = predict_inputs(tmp_path / "cls", [new_scans["nifti"]], tmp_path / "cls_out", progress=False)
    rows = list(csv.DictReader((tmp_path / "cls_out" / "probabilities.csv").open(encoding="utf-8")))
    assert summary["inputs"][0]["items"] == len(rows) > 1
    assert list(rows[0])[-2:] == ["prob_no_disc", "prob_disc"]
    for row in rows:
        assert abs(float(row["prob_no_disc"]) + float(row["prob_disc"]) - 1) < 1e-4
    assert [int(r["slice_index"]) for r in rows] == list(range(len(rows)))

    det = {**meta, "task": {"name": "toy_det", "type": "detection", "level": "slice", "multilabel": False},
           "classes": {"0": "lesion"}, "network": {**meta["network"], "num_outputs": 1},
           "inference": {**meta["inference"], "detection": {"min_score": 0.0, "max_detections": 5}}}
    write_package(tmp_path / "det", det, build_task_model("detection", 3, 1, "resnet10", (16, 16, 8, 8, 8)).state_dict())
    predict_inputs(tmp_path / "det", [new_scans["nifti"]], tmp_path / "det_out", progress=False)
    rows = list(csv.DictReader((tmp_path / "det_out" / "detections.csv").open(encoding="utf-8")))
    assert 1 <= len(rows) <= 5
    affine = new_scans["affine"]
    for row in rows:  # RAS mm and the input voxel index describe the same point
        ijk = np.array([float(row[c]) for c in "ijk"])
        xyz = affine[:3, :3] @ ijk + affine[:3, 3]
        np.testing.assert_allclose(xyz, [float(row[c]) for c in ("x_mm", "y_mm", "z_mm")], atol=1e-2)
    assert [float(r["score"]) for r in rows] == sorted((float(r["score"]) for r in rows), reverse=True)


# -- MONAI bundles ----------------------------------------------------------------------------------------


def test_bundle_runs_with_monai_and_matches_predict(tmp_path, varied, new_scans):
    from monai.bundle import ConfigParser
    from monai.bundle import run as bundle_run
    from monai.networks.nets import FlexibleUNet

    bundle = tmp_path / "bundle"
    code = main(["export", "--bundle", "--model", str(varied), "--out", str(bundle)])
    assert code == 0
    for name in ("configs/metadata.json", "configs/inference.json", "models/model.pt", "models/model.json", "docs/README.md"):
        assert (bundle / name).is_file(), name
    meta = json.loads((bundle / "configs" / "metadata.json").read_text(encoding="utf-8"))
    assert meta["network_data_format"]["inputs"]["image"]["num_channels"] == 3
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"] == {"0": "background", "1": "class_1", "2": "class_2"}
    parser = ConfigParser()
    parser.read_config(bundle / "configs" / "inference.json")
    parser["bundle_root"] = str(bundle)
    net = parser.get_parsed_content("network_def")
    assert type(net) is FlexibleUNet  # plain MONAI: the weights need no medclust class
    net.load_state_dict(torch.load(bundle / "models" / "model.pt", weights_only=True), strict=True)

    source = new_scans["nifti"]
    bundle_run(run_id="run", init_id="initialize", config_file=str(bundle / "configs" / "inference.json"),
               meta_file=str(bundle / "configs" / "metadata.json"), logging_file=False, bundle_root=str(bundle),
               input_files=[str(source)], output_dir=str(tmp_path / "bundle_out"))
    assert torch.is_grad_enabled()  # the bundle leaves no global autograd switch behind in its caller
    predict_inputs(varied, [source], tmp_path / "predict_out", progress=False)
    from_bundle = nib.load(tmp_path / "bundle_out" / "oblique.nii.gz")
    from_predict = nib.load(tmp_path / "predict_out" / "oblique.nii.gz")
    assert len(np.unique(np.asarray(from_predict.dataobj))) >= 2
    np.testing.assert_array_equal(np.asarray(from_bundle.dataobj), np.asarray(from_predict.dataobj))
    np.testing.assert_allclose(from_bundle.affine, from_predict.affine)
    # the bundle's models/ folder is itself a package
    assert load_package(bundle / "models").meta["task"] == load_package(varied).meta["task"]


def test_encoder_package_and_bundle_load_into_flexible_unet(tmp_path, seg_run):
    from monai.bundle import ConfigParser
    from monai.networks.nets.resnet import ResNetEncoder

    torch.manual_seed(3)
    state = ResNetEncoder("resnet10", pretrained=False, spatial_dims=2, in_channels=1).state_dict()
    write_pretrain_package(tmp_path / "pre", state, "joint", {"backbone": "resnet10", "d_model": 64, "seed": 0},
                           [seg_run["store"]], {"loss": 1.0}, {"steps": 5})
    package = load_package(tmp_path / "pre")
    assert package.task_type == "encoder" and package.weights_path.name == "encoder.pt"
    assert package.meta["preprocessing"]["toy"]["settings"]["ct_normalization"] == "nnunet"
    assert "FlexibleUNet" in package.meta["network"]["load_into"]
    with pytest.raises(Exception, match="no task head"):
        package.build_model()
    export_bundle(tmp_path / "pre", tmp_path / "bundle")
    assert "FlexibleUNet" in (tmp_path / "bundle" / "docs" / "README.md").read_text(encoding="utf-8")
    parser = ConfigParser()
    parser.read_config(tmp_path / "bundle" / "configs" / "inference.json")
    parser["bundle_root"] = str(tmp_path / "bundle")
    parser["out_channels"] = 4
    unet = parser.get_parsed_content("flexible_unet_def")
    parser.get_parsed_content("load_into_flexible_unet")
    assert unet.segmentation_head[0].out_channels == 4
    for key, value in state.items():
        torch.testing.assert_close(unet.encoder.state_dict()[key], value)


# -- the Snakemake target ------------------------------------------------------------------------------


def test_snakemake_predict_target_builds_the_run_then_predicts(tmp_path):
    """`snakemake -n predict` with a `predict:` block: the named run is trained first, then predicted."""
    import os
    import re
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    shutil.copy(repo / "config.yaml", tmp_path / "config.yaml")
    (tmp_path / "scan.nrrd").write_bytes(b"")
    (tmp_path / "jobs.yaml").write_text(
        "predict:\n  new_scans:\n    model: results/finetune/chest_organs/joint/1.0/0\n"
        "    inputs: [scan.nrrd, dicom/series]\n    dicom_seg: true\n", encoding="utf-8")
    (tmp_path / "dicom" / "series").mkdir(parents=True)
    done = subprocess.run(
        ["snakemake", "-s", str(repo / "Snakefile"), "predict", "-n", "--nolock", "-p", "--configfile", "config.yaml", "jobs.yaml"],
        cwd=tmp_path, capture_output=True, encoding="utf-8", errors="replace", env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    assert re.search(r"^predict_job\s+1$", out, re.M) and re.search(r"^finetune_run\s+1$", out, re.M)
    command = next(line for line in out.splitlines() if "medclust predict --model" in line)
    assert "--model results/finetune/chest_organs/joint/1.0/0 --input scan.nrrd --input dicom/series" in command
    assert "--dicom-seg" in command and "--out results/predict/new_scans" in command


def test_every_pretraining_run_writes_its_encoder_package(tmp_path):
    from pretrain_helpers import make_stores, tiny_settings

    from medclust.train.recipes import run_pretraining

    stores = make_stores(tmp_path / "stores")
    run_pretraining("none", tiny_settings(), stores, tmp_path / "none")
    package = load_package(tmp_path / "none")
    assert package.task_type == "encoder" and package.name == "none"
    assert sorted(package.meta["preprocessing"]) == sorted(stores)
    assert package.meta["training"]["recipe"] == "pretrain" and package.meta["training"]["method"] == "none"
    encoder = torch.load(tmp_path / "none" / "encoder.pt", weights_only=True)
    state = package.load_state_dict()  # sha256 of model.json matches the encoder.pt written
    assert encoder.keys() == state.keys() and all(torch.equal(encoder[k], state[k]) for k in encoder)

"""Report figures from synthetic inputs: every plot command writes a valid, non-empty PNG."""

from __future__ import annotations

import html
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from medclust.cli import main
from medclust.evaluate import evaluate_run, run_study
from medclust.io.slice_store import write_case
from medclust.report import pca_2d, plot_study_curves, read_loss_curve, verdict_table_html
from medclust.evaluate.study import read_study_table
from medclust.report.study_plots import missing_intervals, verdict_summary
from medclust.report.verdicts import _CELL, effect_text

REPO = Path(__file__).resolve().parents[1]

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _assert_png(path: Path, min_px: int = 100) -> None:
    assert path.exists() and path.stat().st_size > 0, path
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert min(img.size) >= min_px
        # Not a blank canvas: the figure drew something.
        assert len(set(np.asarray(img.convert("L")).ravel().tolist())) > 5


def test_pca_2d_recovers_the_dominant_direction():
    rng = np.random.default_rng(0)
    direction = np.array([3.0, 4.0, 0.0]) / 5.0
    x = rng.normal(size=(200, 1)) * 10 * direction + rng.normal(size=(200, 3)) * 0.1
    coords, ratio = pca_2d(x)
    assert coords.shape == (200, 2) and ratio[0] > 0.99
    assert abs(np.corrcoef(coords[:, 0], x @ direction)[0, 1]) > 0.999


def test_loss_and_embedding_figures(tmp_path):
    for method, scale in (("joint", 1.0), ("swav2d", 1.3)):
        folder = tmp_path / "pretrain" / method
        folder.mkdir(parents=True)
        lines = ["step,loss,loss_intra,loss_inter,loss_mask,lr,items_per_s"]
        for step in range(60):
            inter = "" if method == "swav2d" else f"{2.0 * np.exp(-step / 30):.4f}"
            lines.append(f"{step},{scale * np.exp(-step / 20) + 1:.4f},{np.exp(-step / 25):.4f},{inter},,0.001,50")
        (folder / "metrics.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
        rng = np.random.default_rng(1)
        np.savez(
            folder / "embeddings.npz",
            slice_embeddings=rng.normal(size=(80, 16)).astype(np.float32),
            slice_dataset=np.array(["chest_ct"] * 40 + ["chest_drr"] * 40),
            slice_modality=np.array(["CT"] * 40 + ["XR"] * 40),
            slice_cluster=rng.integers(0, 6, 80),
            volume_embeddings=rng.normal(size=(5, 16)).astype(np.float32),
            volume_dataset=np.array(["chest_ct", "brain_mni", "brain_mni", "lidc_dicom", "chest_ct"]),
            volume_modality=np.array(["CT", "MR", "MR", "CT", "CT"]),
            volume_cluster=np.array([0, 1, 1, 0, 2]),
            volume_case=np.array(list("abcde")),
        )
    assert read_loss_curve(tmp_path / "pretrain" / "joint" / "metrics.csv")["loss"][0] == pytest.approx(2.0)
    out = tmp_path / "report"
    assert main(["plot-loss", "--metrics", *(str(tmp_path / "pretrain" / m / "metrics.csv") for m in ("joint", "swav2d")),
                 "--out", str(out / "loss.png")]) == 0  # fmt: skip
    _assert_png(out / "loss.png")
    assert main(["plot-embeddings", "--embeddings", str(tmp_path / "pretrain/joint/embeddings.npz"),
                 "--out", str(out / "emb.png")]) == 0  # fmt: skip
    _assert_png(out / "emb.png")


def _nifti(path: Path, data: np.ndarray, spacing=(1.5, 1.5, 3.0)) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.diag([*spacing, 1.0])), str(path))
    return str(path)


def _segmentation_runs(root: Path) -> list[Path]:
    """A task with 2 inits x 2 fractions x 2 seeds on one synthetic volume (ball + box)."""
    shape = (32, 32, 12)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    ball = np.linalg.norm((grid - [16, 16, 6]) * [1.5, 1.5, 3.0], axis=-1) <= 9
    raw = np.zeros(shape, np.int16)
    raw[ball] = 7
    raw[4:10, 4:10, 2:10] = 9
    image = _nifti(root / "data" / "img.nii.gz", (raw * 50 + np.random.default_rng(0).normal(0, 20, shape)).astype(np.float32))
    label = _nifti(root / "data" / "lab.nii.gz", raw)
    files = []
    for init, quality in (("none", 0), ("joint", 1)):
        for fraction in (0.5, 1.0):
            for seed in (0, 1):
                run = root / "finetune" / "organs" / init / f"{fraction:g}" / str(seed)
                pred = np.zeros(shape, np.int16)
                pred[np.roll(ball, 2 - quality - int(fraction), axis=0)] = 1
                pred[4 : 10 - seed, 4:10, 2:10] = 2
                _nifti(run / "predictions" / "c0.nii.gz", pred)
                roi = np.zeros(shape, np.uint8)
                roi[:, :, 1:11] = 1
                _nifti(run / "roi" / "c0.nii.gz", roi)
                (run / "run.json").write_text(json.dumps({
                    "task": "organs", "type": "segmentation", "dataset": "ct", "init": init, "fraction": fraction,
                    "seed": seed, "trained_on": "real labels", "classes": {"1": "ball", "2": "box"},
                    "test_cases": [{"case_id": "c0", "image": image, "label": label, "label_map": {"7": 1, "9": 2},
                                    "prediction": "predictions/c0.nii.gz", "roi": "roi/c0.nii.gz"}],
                }), encoding="utf-8")  # fmt: skip
                evaluate_run(run)
                files.append(run / "metrics.json")
    return files


def test_study_and_segmentation_figures(tmp_path):
    files = _segmentation_runs(tmp_path)
    table = tmp_path / "study" / "organs.csv"
    run_study("organs", files, table, {"bootstrap_samples": 200})
    out = tmp_path / "report"
    assert main(["plot-study", "--table", str(table), "--out", str(out / "curves.png")]) == 0
    assert main(["plot-study", "--table", str(table), "--kind", "table", "--out", str(out / "table.png")]) == 0
    runs = [str(tmp_path / "finetune/organs" / i / "1" / "0") for i in ("none", "joint")]
    assert main(["plot-examples", "--kind", "segmentation", "--runs", *runs, "--out", str(out / "seg.png")]) == 0
    for name in ("curves.png", "table.png", "seg.png"):
        _assert_png(out / name)
    # Simulated cells are flagged in the title (checked through the plot API's input).
    rows = read_study_table(table)
    for row in rows:
        row["simulated"] = True
    plot_study_curves(rows, out / "sim.png")
    _assert_png(out / "sim.png")


def test_two_seeds_one_case_draw_no_band_and_say_inconclusive(tmp_path):
    files = _segmentation_runs(tmp_path)  # 2 seeds, 1 test case: the design supports no interval
    table = tmp_path / "study" / "organs.csv"
    rows = [r for r in run_study("organs", files, table, {"bootstrap_samples": 200}) if r["primary"]]
    reason = "none: 2 seeds < 3 and 1 test case < 5"
    assert missing_intervals(rows) == [f"{r['init']} @ {r['fraction']:g}: {reason}" for r in rows]
    paired = "none: 2 paired seeds < 3 and 1 test case < 5"
    assert missing_intervals(rows, difference=True) == [f"joint @ {f:g}: {paired}" for f in (0.5, 1.0)]
    assert verdict_summary(rows) == "joint vs none — 0.5: inconclusive, 1: inconclusive"
    # the verdict table (HTML fragment) lists every comparison with its effect, method and verdict
    out = tmp_path / "report" / "verdicts.html"
    assert main(["verdict-table", "--tables", str(table), "--out", str(out)]) == 0
    text = html.unescape(out.read_text(encoding="utf-8"))
    assert text.count("<tr>") == 1 + 2  # header + joint at two fractions
    for r in (r for r in rows if r["init"] == "joint"):
        assert f"<td style=\"{_CELL}\">{effect_text(r)}</td>" in text
        assert effect_text(r).endswith("(no interval)")
    assert text.count(paired) == 2 and text.count("inconclusive (too few seeds or cases)") == 2
    assert "helps</td>" not in text


def test_verdict_table_shades_and_orders_comparisons():
    base = {"task": "t", "metric": "dice_mean", "primary": True, "ref_init": "none", "n_pairs": 5, "n_cases": 8,
            "diff_ci_method": "two-level bootstrap (5 paired seeds, 8 cases, t on 9.0 df)", "ci_level": 0.95}  # fmt: skip
    rows = [
        {**base, "init": "none", "fraction": 1.0, "verdict": ""},
        {**base, "init": "joint", "fraction": 0.25, "diff_vs_ref": 0.1, "diff_ci_low": 0.02, "diff_ci_high": 0.18,
         "verdict": "helps"},
        {**base, "init": "joint", "fraction": 1.0, "diff_vs_ref": -0.01, "diff_ci_low": -0.05, "diff_ci_high": 0.03,
         "verdict": "no detectable difference"},
        {**base, "metric": "hd95_mean", "primary": False, "init": "joint", "fraction": 1.0, "diff_vs_ref": 3.0,
         "diff_ci_low": 1.0, "diff_ci_high": 5.0, "verdict": "hurts"},
    ]  # fmt: skip
    text = verdict_table_html([rows])
    body = text.split("<tbody>")[1]
    assert body.count("<tr>") == 2  # the reference and secondary metrics are not verdict rows
    first, second = body.split("</tr>")[:2]
    assert "+0.100 [+0.020, +0.180]" in first and "#d9f2d9" in first and "helps" in first
    assert "-0.010 [-0.050, +0.030]" in second and "#eeeeee" in second and "no detectable difference" in second
    assert "95% interval" in text
    assert verdict_table_html([rows[:1]]).startswith("<p>No comparison")


def _render_like_snakemake(rst: Path, **context: object) -> str:
    """A caption rendered as `snakemake --report` does: Jinja (trim/lstrip blocks), then docutils."""
    from docutils.core import publish_parts
    from jinja2 import Environment

    text = Environment(trim_blocks=True, lstrip_blocks=True).from_string(rst.read_text(encoding="utf-8")).render(**context)
    return publish_parts(text, writer="html")["html_body"]


def test_opening_page_and_study_captions_show_the_verdicts(tmp_path, monkeypatch):
    from types import SimpleNamespace

    monkeypatch.chdir(tmp_path)  # the report renders relative output paths from the working dir
    files = _segmentation_runs(tmp_path)
    run_study("organs", files, tmp_path / "study.csv", {"bootstrap_samples": 200})
    fragment = Path("results/report/verdicts.html")
    assert main(["verdict-table", "--tables", "study.csv", "--out", str(fragment)]) == 0
    config = {"study": {"ci_level": 0.95, "bootstrap_samples": 2000}, "finetune": {"seeds": [0, 1]}}
    record = SimpleNamespace(target="verdicts.html", path=fragment)
    page = _render_like_snakemake(REPO / "workflow/report/workflow.rst",
                                  snakemake=SimpleNamespace(config=config), files=[record])  # fmt: skip
    assert page.index("Verdicts") < page.index('<table class="medclust-verdicts"') < page.index("How to read them")
    assert "inconclusive (too few seeds or cases)" in page and "2 seed(s) per cell" in page
    assert "none: 2 paired seeds &lt; 3 and 1 test case &lt; 5" in page
    empty = _render_like_snakemake(REPO / "workflow/report/workflow.rst", snakemake=SimpleNamespace(config=config), files=[])
    assert "not available" in empty and "medclust-verdicts" not in empty
    job = SimpleNamespace(config=config, wildcards=SimpleNamespace(task="organs"), output=SimpleNamespace(verdicts=str(fragment)))
    for caption in ("study_curves.rst", "study_table.rst"):
        text = _render_like_snakemake(REPO / "workflow/report" / caption, snakemake=job)
        assert '<table class="medclust-verdicts"' in text and "inconclusive (too few seeds or cases)" in text


def test_detection_figure(tmp_path):
    # A store volume of 40x40x10 voxels, 2 mm in-plane, 4 mm slices, origin at 0.
    affine = np.diag([2.0, 2.0, 4.0, 1.0])
    image = np.random.default_rng(0).uniform(0, 1, (10, 40, 40)).astype(np.float32)  # (S, X, Y)
    attrs = {
        "case_id": "s0", "dataset": "lidc", "modality": "CT", "simulated": False, "source_path": "x",
        "source_sha256": "0", "label_path": "", "original_shape": [40, 40, 10], "original_spacing": [2, 2, 4],
        "original_affine": affine.tolist(), "store_affine": affine.tolist(), "target_spacing": [2, 2, 4],
        "slice_axis": 2, "z_positions_mm": [4.0 * i for i in range(10)], "normalisation": "{}",
        "medclust_version": "0",
    }  # fmt: skip
    write_case(tmp_path / "slices" / "lidc" / "s0.h5", image, attrs)
    runs = []
    for init, dx in (("none", 30.0), ("joint", 1.0)):
        run = tmp_path / "finetune" / "nod" / init / "1" / "0"
        run.mkdir(parents=True)
        (run / "run.json").write_text(json.dumps({
            "task": "nod", "type": "detection", "dataset": "lidc", "init": init, "fraction": 1.0, "seed": 0,
            "trained_on": "simulated nodules", "classes": {"0": "nodule"}, "predictions": "detections.csv",
            "detection": {"min_hit_radius_mm": 5.0},
            "test_cases": [{"case_id": "s0", "lesions": [{"x_mm": 40, "y_mm": 30, "z_mm": 20, "diameter_mm": 10}]}],
        }), encoding="utf-8")  # fmt: skip
        (run / "detections.csv").write_text(
            "case_id,x_mm,y_mm,z_mm,score,diameter_mm,n_slices\n"
            f"s0,{40 + dx},30,20,0.9,8,2\ns0,10,60,21,0.4,6,1\n",
            encoding="utf-8",
        )
        evaluate_run(run)
        runs.append(str(run))
    out = tmp_path / "det.png"
    assert main(["plot-examples", "--kind", "detection", "--runs", *runs, "--slices", str(tmp_path / "slices/lidc"),
                 "--out", str(out)]) == 0  # fmt: skip
    _assert_png(out)
    from medclust.report import detection_example

    example = detection_example({"none": runs[0], "joint": runs[1]}, tmp_path / "slices/lidc")
    item = example["slices"][0]
    assert item["lesions"][0][:2] == pytest.approx((20.0, 15.0))  # (40 mm, 30 mm) / 2 mm
    hits = {init: [d[3] for d in dets] for init, dets in item["detections"].items()}
    assert hits == {"none": [False, False], "joint": [True, False]}
    assert example["simulated"] is True

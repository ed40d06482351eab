"""Why a pretrained encoder scores below random init on the structure probe: controls and diagnosis.

The learning monitor compares each pretrained encoder with its random initialisation on free
labels. When a trained encoder falls below random init on ``structures`` (which label groups a
slice shows), two explanations must be told apart: the probe cannot register anatomy on this
data, or the objective learned something else. This script measures both on the demo's slice
stores, with the monitor's own probe set, feature extraction and protocol:

- **positive control**: for every dataset with ``probe_structures``, the seeded random encoder
  is trained *with* the structure labels (multi-label BCE on the monitor's features, only the
  items of even ``--block-mm`` z blocks), then probed like any encoder. If it clearly beats
  random init on the odd (never trained on) blocks, the probe can register anatomy there.
- **the pretrained encoders** (``results/pretrain/{method}/encoder.pt``), scored on the same
  odd blocks and on all items (the monitor's number).
- **what the features encode**: per dataset, the effective rank (RankMe) of the features, the
  share of variance of the leading principal direction and its correlation with the fraction of
  the view the body fills (pixels above ``--foreground``) and with z.

Last line (machine-readable): ``<encoder>_structures_knn=<x> <encoder>_structures_linear=<y>``
(all items, the monitor's number; not for the control, which has seen half of them) and
``<encoder>_<dataset>_odd_blocks_<knn|linear>=<mean AUC over the dataset's structures>``. Run from the repository root after the demo's pretraining
(``snakemake --cores 2 pretrain``); ~1-2 min on 2 CPU cores::

    python benchmarks/probe_controls.py [--configfile config.yaml] [--methods joint swav2d]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import nn

from medclust.data import collect_cases
from medclust.evaluate.collapse import dataset_ranks
from medclust.data.probe_set import ProbeSet
from medclust.evaluate.probes import (
    ProbeSettings,
    ProbeTarget,
    fit_exclusion,
    knn_scores,
    linear_scores,
    macro_auc,
    probe_units,
    run_probes,
    unit_folds,
)
from medclust.train.monitor import build_monitor
from medclust.train.recipes import PretrainTask, resolve_settings


def _held_out_auc(
    features: torch.Tensor, target: ProbeTarget, ps: ProbeSet, dataset: str, scored: np.ndarray, s: ProbeSettings
) -> dict[str, tuple[float, float]]:
    """Per structure column of ``dataset``: (kNN, linear) ROC AUC of the monitor's out-of-fold
    predictions (same units, folds and z gap), counted over the ``scored`` items only."""
    rows = np.flatnonzero(ps.dataset == dataset)
    cols = [j for j in range(target.values.shape[1]) if np.isfinite(target.values[rows, j]).all()]
    y = torch.from_numpy(target.values[np.ix_(rows, cols)]).float()
    folds = unit_folds(probe_units(ps.case[rows], ps.z_mm[rows], s.block_mm), s.folds)
    near = fit_exclusion(ps.case[rows], ps.z_mm[rows], s.gap_mm)
    x = features[torch.from_numpy(rows)]
    knn, lin = torch.zeros(y.shape), torch.zeros(y.shape)
    for f in np.unique(folds):
        q = folds == f
        fit = torch.from_numpy(np.flatnonzero(~q & ~near[:, q].any(axis=1)))
        qi = torch.from_numpy(np.flatnonzero(q))
        knn[qi] = knn_scores(x[fit], y[fit], x[qi], s.knn_k, s.knn_temperature)
        lin[qi] = linear_scores(x[fit], y[fit], x[qi], True, s.linear_l2, s.linear_steps)
    keep = scored[rows]
    out = {}
    for j, col in enumerate(cols):
        t = y[keep, j].numpy()
        if 0 < t.sum() < t.size:
            name = (target.columns or [])[col]
            out[name] = (macro_auc(t[:, None], knn[keep, j, None].numpy()), macro_auc(t[:, None], lin[keep, j, None].numpy()))
    return out


def _control(task: PretrainTask, monitor, target: ProbeTarget, train_rows: np.ndarray, steps: int, seed: int) -> nn.Module:
    """The seeded random model with its encoder trained on the structure labels of ``train_rows``."""
    model = monitor.random_model()
    encoder = model.encoder
    ps = monitor.probe_set
    values = torch.from_numpy(target.values[train_rows]).float()
    known = torch.isfinite(values).float()  # a column applies only to its own dataset's items
    y = torch.nan_to_num(values)
    x = ps.images[torch.from_numpy(train_rows), None]
    head = nn.Linear(sum(encoder.feature_channels), values.shape[1])
    opt = torch.optim.Adam([*encoder.parameters(), *head.parameters()], lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    encoder.train()
    for _ in range(steps):
        b = torch.randint(len(train_rows), (16,), generator=g)
        logits = head(torch.cat(encoder.stage_features(x[b]), 1))
        loss = nn.functional.binary_cross_entropy_with_logits(logits, y[b], weight=known[b], reduction="sum") / known[b].sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configfile", default="config.yaml")
    parser.add_argument("--methods", nargs="*", help="default: every results/pretrain/{method} with an encoder.pt")
    parser.add_argument("--encoder", nargs="*", default=[], metavar="NAME=PATH", help="more encoder.pt files to score")
    parser.add_argument("--block-mm", type=float, default=40.0, help="z blocks: the control trains on even ones")
    parser.add_argument("--control-steps", type=int, default=150)
    parser.add_argument("--foreground", type=float, default=0.1, help="intensity above which a pixel is body")
    args = parser.parse_args()

    config = yaml.safe_load(Path(args.configfile).read_text(encoding="utf-8"))
    results = Path(config.get("results_dir", "results"))
    s = resolve_settings({**config["pretrain"], "seed": config.get("seed", 0)})
    names = s.get("datasets") or config["pretrain"]["datasets"]
    stores = [results / "slices" / d for d in names]
    if not all((p / "index.json").is_file() for p in stores):
        sys.exit(f"slice stores missing under {results}/slices: run `snakemake --cores 2 pretrain` first")
    cases = collect_cases([str(p) for p in stores], s["splits"])
    task = PretrainTask("joint", s, cases)
    monitor = build_monitor(s, cases, task.build_model, 0, config["datasets"])
    if monitor is None:
        sys.exit("pretrain.probe.enabled is false: nothing to probe")
    ps = monitor.probe_set
    settings = ProbeSettings.from_dict(s["probe"])
    target = next((t for t in ps.targets if t.name == "structures"), None)
    if target is None:
        sys.exit("no dataset has probe_structures: no structure probe to explain")

    methods = args.methods or sorted(p.parent.name for p in (results / "pretrain").glob("*/encoder.pt") if p.parent.name != "none")
    encoders: dict[str, nn.Module] = {"random": monitor.random_model()}
    paths = {m: results / "pretrain" / m / "encoder.pt" for m in methods}
    paths.update(dict(item.split("=", 1) for item in args.encoder))
    for method, path in paths.items():
        model = monitor.random_model()
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.encoder.backbone.load_state_dict(state, strict=True)
        encoders[method] = model

    z0 = {d: ps.z_mm[ps.dataset == d].min() for d in np.unique(ps.dataset)}
    block = np.array([int((z - z0[d]) // args.block_mm) for z, d in zip(ps.z_mm, ps.dataset)])
    has_structures = ~np.isnan(target.values).all(axis=1)
    train_rows = np.flatnonzero(has_structures & (block % 2 == 0))
    held_out = has_structures & (block % 2 == 1)
    structure_sets = sorted(set(ps.dataset[has_structures].tolist()))
    encoders["control"] = _control(task, monitor, target, train_rows, args.control_steps, int(s["seed"]))

    features = {name: monitor.embed(model) for name, model in encoders.items()}
    body = (ps.images > args.foreground).float().mean(dim=(1, 2)).numpy()
    final = []
    print(f"probe set: {len(ps)} items; structure columns {target.columns}; control trained on {train_rows.size} items "
          f"of even {args.block_mm:g} mm blocks for {args.control_steps} steps")
    for name, f in features.items():
        # the monitor's own probes, on the features already embedded (not for the control: it saw half the items)
        overall = run_probes(f, ps.targets, ps.case, ps.z_mm, ps.dataset, settings) if name != "control" else None
        line = [f"{name:>14}:"]
        if overall is not None:
            r = overall["structures"]
            line.append(f"structures all items kNN/linear {r.knn:.3f}/{r.linear:.3f}")
            final += [f"{name}_structures_knn={r.knn:.4f}", f"{name}_structures_linear={r.linear:.4f}"]
        for d in structure_sets:
            scores = _held_out_auc(f, target, ps, d, held_out, settings)
            means = [np.mean([v[i] for v in scores.values()]) for i in (0, 1)] if scores else [float("nan")] * 2
            final += [f"{name}_{d}_odd_blocks_knn={means[0]:.4f}", f"{name}_{d}_odd_blocks_linear={means[1]:.4f}"]
            line.append(
                f"{d}, odd blocks: kNN/linear {means[0]:.3f}/{means[1]:.3f} ("
                + ", ".join(f"{k.split(':')[-1]} {a:.2f}/{b:.2f}" for k, (a, b) in scores.items())
                + ")"
            )
        print(" ".join(line[:2]))
        for part in line[2:]:
            print(" " * 16 + part)
        ranks = dataset_ranks(f, ps.dataset)
        for d in structure_sets:
            x = f[torch.from_numpy(np.flatnonzero(ps.dataset == d))].double().numpy()
            x = x - x.mean(0)
            u, sv, _ = np.linalg.svd(x, full_matrices=False)
            pc = u[:, 0] * sv[0]
            rows = ps.dataset == d
            print(" " * 16 + f"{d}: effective rank {ranks.get(d, float('nan')):.1f}, first direction {sv[0] ** 2 / (sv ** 2).sum():.0%} "
                  f"of the variance, |r| with body fraction {abs(np.corrcoef(pc, body[rows])[0, 1]):.2f}, with z {abs(np.corrcoef(pc, ps.z_mm[rows])[0, 1]):.2f}")
    print(" ".join(final))


if __name__ == "__main__":
    main()

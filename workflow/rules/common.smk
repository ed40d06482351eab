# Input functions, wildcard constraints and helpers shared by every stage. No rules here.
import json
import re
import shlex
from pathlib import Path

RESULTS = config["results_dir"]
RESOURCES = config["resources_dir"]
DATASETS = config["datasets"]


wildcard_constraints:
    dataset="|".join(DATASETS),
    case=r"[A-Za-z0-9][A-Za-z0-9._-]*",
    item=r"[a-z0-9_]+",
    seed=r"\d+",
    fraction=r"[0-9.]+",


def as_json(obj):
    """A params value the CLI reads with --settings; changes to it re-trigger the rule."""
    return json.dumps(obj, sort_keys=True)


def rule_resources(name, **defaults):
    """Resources for the named rule: defaults, overridden by config `resources.<name>`.

    Threads are not a resource (they go through `threads:` and rule_threads), so any
    `threads` entry is left out here.
    """
    merged = dict(defaults)
    merged.update(config.get("resources", {}).get(name, {}))
    merged.pop("threads", None)
    return merged


def preprocess_settings(dataset):
    """Global `preprocess` block with the dataset's own overrides applied; the CT normalisation
    keys come from the dataset named by `intensity_from`, if any (intensity_source)."""
    merged = dict(config["preprocess"])
    merged.update(DATASETS[dataset].get("preprocess", {}))
    source = intensity_source(dataset)
    if source != dataset:
        own = dict(config["preprocess"])
        own.update(DATASETS[source].get("preprocess", {}))
        for key in CT_INTENSITY_KEYS:
            merged[key] = own.get(key)
    return {k: v for k, v in merged.items() if v is not None}


def dataset_settings(dataset):
    """Everything the data stage needs to know about one dataset, resolved."""
    entry = dict(DATASETS[dataset])
    entry["name"] = dataset
    entry["preprocess"] = preprocess_settings(dataset)
    return entry


def cases_of(dataset):
    """Case ids that passed QC (needs the ingest checkpoint to have run)."""
    cases_json = checkpoints.ingest.get(dataset=dataset).output.cases
    with open(cases_json, encoding="utf-8") as handle:
        return [case["case_id"] for case in json.load(handle)["cases"]]


def slice_store_files(wildcards):
    return expand(f"{RESULTS}/slices/{wildcards.dataset}/{{case}}.h5", case=cases_of(wildcards.dataset))


def data_targets(wildcards):
    targets = []
    for name in DATASETS:
        targets += [
            f"{RESULTS}/slices/{name}/index.json",
            f"{RESULTS}/slices/{name}/splits.json",
            f"{RESULTS}/qc/{name}.tsv",
        ]
    return targets


# --- evaluation, study and report helpers (evaluation stage; begin) ----------------------------


def study_tasks():
    """{task: settings} of the fine-tuning study (config `finetune.tasks`)."""
    return dict(config.get("finetune", {}).get("tasks", {}) or {})


def task_runs(task):
    """Every run folder of `task` (the fine-tuning stage's grid)."""
    return [str(d).rstrip("/") for d in finetune_run_dirs(task)]


def _run_key(run_dir):
    """(init, fraction, seed) of a run folder .../{task}/{init}/{fraction}/{seed}."""
    parts = Path(run_dir).parts
    return parts[-3], float(parts[-2]), int(parts[-1])


def example_runs(task):
    """One run per init for the example figures: the largest fraction, the smallest seed."""
    runs = task_runs(task)
    if not runs:
        return []
    top = max(_run_key(r)[1] for r in runs)
    chosen = {}
    for run in sorted(runs, key=lambda r: _run_key(r)[2]):
        init, fraction, _ = _run_key(run)
        if fraction == top and init not in chosen:
            chosen[init] = run
    return [chosen[i] for i in sorted(chosen, key=lambda i: (i != "none", i))]


def study_targets(wildcards):
    """Every study table and every report figure."""
    return [f"{RESULTS}/study/{task}.csv" for task in study_tasks()] + report_targets()


def report_methods():
    """Pretraining methods whose outputs the report shows (config `pretrain.methods`)."""
    return list(config.get("pretrain", {}).get("methods", []) or [])


def trained_methods():
    """Methods with a training log (random init `none` is not trained)."""
    return [m for m in report_methods() if m != "none"]


def task_type(task):
    return study_tasks()[task].get("type", "segmentation")


def task_test_dataset(task):
    settings = study_tasks()[task]
    return settings.get("test_dataset", settings.get("dataset"))


# --- a model trained on simulated images, applied to real ones (report.smk, task key `real_images`)


def real_image_tasks():
    """{task: real dataset} of the tasks whose model the report shows on real images."""
    return {t: s["real_images"] for t, s in study_tasks().items() if s.get("real_images")}


def real_image_run(task):
    """The run shown: first pretrained init of the task's grid (else none), first fraction and seed."""
    inits, fractions, seeds = finetune_grid(task)
    init = next((i for i in inits if i != "none"), inits[0])
    return f"{RESULTS}/finetune/{task}/{init}/{fraction_name(fractions[0])}/{seeds[0]}"


def real_image_targets():
    return [f"{RESULTS}/report/real_images/{task}.png" for task in real_image_tasks()]


def report_targets():
    """Every report figure of the configured study."""
    targets = []
    if trained_methods():
        targets.append(f"{RESULTS}/report/pretrain_loss.png")
        targets.append(f"{RESULTS}/report/probe_curves.png")
    targets += [f"{RESULTS}/report/embeddings/{m}.png" for m in report_methods()]
    if study_tasks():
        targets.append(f"{RESULTS}/report/verdicts.html")
    for task in study_tasks():
        targets += [f"{RESULTS}/report/study/{task}_curves.png", f"{RESULTS}/report/study/{task}_table.png"]
        if task_type(task) in ("segmentation", "detection"):
            targets.append(f"{RESULTS}/report/examples/{task}.png")
    targets += real_image_targets()  # report.smk
    if len(report_methods()) >= 3:  # a family of methods side by side (report.smk method_comparison)
        targets += [f"{RESULTS}/report/method_comparison.{ext}" for ext in ("csv", "html", "png")]
    return targets


def example_inputs(wildcards):
    files = [f"{run}/metrics.json" for run in example_runs(wildcards.task)]
    if task_type(wildcards.task) == "detection":
        files.append(f"{RESULTS}/slices/{task_test_dataset(wildcards.task)}/index.json")
    return files


# --- evaluation, study and report helpers (end) ------------------------------------------------


# --- scale-out: conda env and the launcher of training processes (begin) ----------------------
# Training rules start their command with the launch prefix so that one rule works on a laptop,
# on one or several GPUs of a node and across nodes:
#     params: launch=lambda wildcards, resources, threads: launch_prefix(resources, threads),
#     shell: "{params.launch}medclust pretrain ... > {log:q} 2>&1"
import os
import re

from snakemake.exceptions import WorkflowError

# `conda: MEDCLUST_ENV` in a rule lets `--use-conda` run it in envs/medclust.yaml (paths in rule
# directives are relative to this folder). pip in that env installs this checkout from
# MEDCLUST_ROOT, which must therefore be known when Snakemake creates the env.
MEDCLUST_ENV = "../../envs/medclust.yaml"
os.environ.setdefault("MEDCLUST_ROOT", str(Path(workflow.basedir).resolve()))

# torchrun's c10d rendezvous port on the head node, offset by the job id so that two multi-node
# jobs sharing a head node do not collide.
RDZV_BASE_PORT = 29500


def gpus_per_node(resources):
    """GPUs a rule uses on each node.

    Args:
        resources: the job's resources (`resources` argument of a params function).

    Returns:
        N from a per-node `gres="gpu[:type]:N"` request if present, else the `gpu` resource, else 0.
    """
    gres = str(resources.get("gres", "") or "")
    match = re.search(r"(?:^|,)gpu(?::[A-Za-z0-9_.]+)?:(\d+)", gres)
    if match:
        return int(match.group(1))
    return int(resources.get("gpu", 0) or 0)


def launch_prefix(resources, threads=1):
    """Shell prefix that starts a training command on the rule's CPUs/GPUs/nodes.

    - no or one GPU, one node: `exec ` (the command itself);
    - more GPUs on one node: `exec torchrun --standalone --nproc_per_node=<gpus> --no-python `;
    - several nodes (the SLURM plugin's `mpi` resource, e.g. `mpi="srun", nodes=2, tasks=2,
      gres="gpu:4", tasks_per_gpu=0`): `exec srun` runs one torchrun agent per node, which meet
      at a c10d rendezvous on the job's first node and start `gres` GPUs' worth of ranks each.
    `exec` replaces the job's bash so that SLURM's SIGTERM/SIGUSR1 reaches the trainer (which
    checkpoints and exits 143/138) without a shell in between. The prefix must therefore start the
    rule's last command. `--no-python` lets torchrun start the `medclust` console script.

    Args:
        resources: the job's resources (`resources` argument of a params function).
        threads: the job's threads (CPUs per task for the multi-node srun step).

    Returns:
        The prefix, ending in a space, to put directly before `medclust <stage> ...`.
    """
    gpus = gpus_per_node(resources)
    nodes = int(resources.get("nodes", 1) or 1)
    mpi = resources.get("mpi")
    if mpi:
        launcher = str(mpi)
        if launcher.split()[0] == "srun":
            # Inside the job the SLURM plugin strips SLURM_NTASKS/SLURM_CPUS_PER_TASK & co. from the
            # environment, so the step geometry is spelled out here rather than inherited.
            launcher += f" --nodes={nodes} --ntasks-per-node=1 --cpus-per-task={threads} --kill-on-bad-exit=1"
            if gpus:
                launcher += f" --gres=gpu:{gpus}"
        head = '$(scontrol show hostnames "$(squeue -h -j "$SLURM_JOB_ID" -o %N)" | head -n1)'
        port = f"$(({RDZV_BASE_PORT} + SLURM_JOB_ID % 1000))"
        return (
            f"exec {launcher} torchrun --nnodes={nodes} --nproc_per_node={max(gpus, 1)} "
            f"--rdzv-id=$SLURM_JOB_ID --rdzv-backend=c10d --rdzv-endpoint={head}:{port} --no-python "
        )
    if nodes > 1:
        raise WorkflowError(
            f"nodes={nodes} needs the `mpi` resource (e.g. mpi='srun', tasks={nodes}) to start "
            "one torchrun agent per node; see workflow/profiles/slurm-multinode/config.yaml"
        )
    if gpus > 1:
        return f"exec torchrun --standalone --nnodes=1 --nproc_per_node={gpus} --no-python "
    return "exec "


# --- scale-out (end) ---------------------------------------------------------------------------


# --- demo data and simulated radiographs helpers (data stage; begin) ---------------------------
DRR_DATASETS = [name for name, entry in DATASETS.items() if entry.get("format") == "drr"]
# A regex matching only the drr datasets (one that matches nothing when there are none).
DRR_DATASETS_PATTERN = "|".join(DRR_DATASETS) or "(?!x)x"


def demo_input(dataset):
    """[sources.json of the demo item `dataset` unpacks] (config `datasets.*.demo`), else [].

    Accepts a dataset name or a wildcards object with a `dataset` attribute, so it works both
    inside other input functions and directly as `input: demo=demo_input`.
    """
    name = getattr(dataset, "dataset", dataset)
    item = DATASETS[name].get("demo")
    return [f"{RESOURCES}/demo/{item}/sources.json"] if item else []


def drr_source_cases(wildcards):
    """The ingest cases list of the CT dataset a drr dataset simulates radiographs from."""
    source = DATASETS[wildcards.dataset].get("source")
    if source not in DATASETS:
        raise ValueError(f"config datasets.{wildcards.dataset}.source: {source!r} is not a configured dataset")
    return f"{RESULTS}/cases/{source}.json"


# --- demo data and simulated radiographs helpers (end) -----------------------------------------


# --- ingest and preprocessing helpers (data stage; begin) --------------------------------------


def rule_threads(name, default):
    """Threads for the named rule: config `resources.<name>.threads`, else `default`."""
    return int(config.get("resources", {}).get(name, {}).get("threads", default))


def ingest_settings(dataset):
    """dataset_settings plus what ingest needs: on_bad_input, max_voxels, dicom_gaps (the
    dataset's own, else the top-level one), and the manifest of a drr dataset."""
    settings = dataset_settings(dataset)
    settings["on_bad_input"] = config["on_bad_input"]
    settings["max_voxels"] = config["max_voxels"]
    if settings.get("dicom_gaps") is None:
        settings["dicom_gaps"] = config.get("dicom_gaps")
    if settings["format"] == "drr":
        settings["path"] = f"{RESULTS}/drr/{dataset}/manifest.tsv"
    return settings


def ingest_inputs(wildcards):
    """Files a dataset's ingest waits for: the demo item's sources.json, the simulated
    radiographs' manifest, or the user's own manifest/folder (so that changing it re-runs QC)."""
    entry = DATASETS[wildcards.dataset]
    inputs = {"demo": demo_input(wildcards.dataset)}
    if entry["format"] == "drr":
        inputs["source"] = f"{RESULTS}/drr/{wildcards.dataset}/manifest.tsv"
    elif not entry.get("demo") and entry.get("path"):
        inputs["source"] = entry["path"]
    return inputs


def case_entry(dataset, case):
    """The entry of `case` in the ingest checkpoint's case list of `dataset`."""
    cases_json = checkpoints.ingest.get(dataset=dataset).output.cases
    with open(cases_json, encoding="utf-8") as handle:
        for entry in json.load(handle)["cases"]:
            if entry["case_id"] == case:
                return cases_json, entry
    raise ValueError(f"{cases_json}: no case {case!r} (skipped by QC? see {RESULTS}/qc/{dataset}.tsv)")


def preprocess_inputs(wildcards):
    """The case list and the case's image (file or DICOM folder) and label, as rule inputs."""
    cases_json, entry = case_entry(wildcards.dataset, wildcards.case)
    inputs = {"cases": cases_json, "image": entry["image"]}
    if entry.get("label"):
        inputs["label"] = entry["label"]
    if entry.get("modality") in (None, "CT") and intensity_file(wildcards.dataset):
        inputs["intensity"] = intensity_file(wildcards.dataset)[0]
    return inputs


def index_settings(dataset):
    """What `medclust index` needs: the dataset name, the seed, the `splits` block and the
    dataset's path (a manifest: named when its fixed splits split a group)."""
    entry = config["datasets"].get(dataset) or {}
    return {"dataset": dataset, "seed": config["seed"], "splits": config["splits"], "source": entry.get("path")}


# CT normalisation keys a dataset takes from its `intensity_from` dataset.
CT_INTENSITY_KEYS = ("ct_normalization", "ct_window")


def intensity_source(dataset):
    """The dataset whose CT normalisation `dataset` uses: its `intensity_from` chain, else itself."""
    chain = [dataset]
    while DATASETS[chain[-1]].get("intensity_from"):
        source = DATASETS[chain[-1]]["intensity_from"]
        if source not in DATASETS:
            raise WorkflowError(f"config datasets.{chain[-1]}.intensity_from: {source!r} is not a configured dataset")
        if source in chain:
            raise WorkflowError(f"config datasets.*.intensity_from: a cycle {' -> '.join(chain + [source])}")
        chain.append(source)
    return chain[-1]


def needs_fingerprint(dataset):
    """True when `dataset` may hold CT normalised with nnU-Net's scheme (its config does not say
    MR/XR and it is not a folder of 2D images or simulated radiographs)."""
    entry = DATASETS[dataset]
    if entry.get("format") in ("images", "drr") or entry.get("modality") in ("MR", "XR"):
        return False
    return preprocess_settings(dataset).get("ct_normalization", "nnunet") == "nnunet"


def intensity_file(dataset):
    """[intensity.json of the dataset `dataset` takes its CT fingerprint from], or []."""
    return [f"{RESULTS}/slices/{intensity_source(dataset)}/intensity.json"] if needs_fingerprint(dataset) else []


def fingerprint_inputs(wildcards):
    """The case list and every case's image and label (the split decides which are used)."""
    cases_json = checkpoints.ingest.get(dataset=wildcards.dataset).output.cases
    with open(cases_json, encoding="utf-8") as handle:
        entries = json.load(handle)["cases"]
    return {
        "cases": cases_json,
        "images": [e["image"] for e in entries],
        "labels": [e["label"] for e in entries if e.get("label")],
    }


def intensity_arg(wildcards, input):
    """`--intensity FILE` for `medclust preprocess` when the case's dataset has a CT fingerprint."""
    return f"--intensity {shlex.quote(str(input.intensity))}" if "intensity" in input.keys() else ""


# --- ingest and preprocessing helpers (end) ----------------------------------------------------


# --- fine-tuning helpers (fine-tuning stage; begin) --------------------------------------------
# One run per {task}/{init}/{fraction}/{seed}; the grid (inits, fractions, seeds) is study-wide in
# config `finetune` and may be overridden per task. Folder names use str(float(fraction)).
FINETUNE_GRID_KEYS = ("inits", "fractions", "seeds")
# how runs are grouped into jobs; changes no run, so never part of a run's settings
FINETUNE_JOB_KEYS = ("seeds_per_job",)


def fraction_name(fraction):
    """The {fraction} folder name of a label fraction (0.25 -> "0.25", 1 -> "1.0")."""
    return str(float(fraction))


def finetune_grid(task):
    """(inits, fractions, seeds) of `task`: its own lists, else the study-wide ones."""
    ft = config["finetune"]
    entry = ft["tasks"][task]
    inits, fractions, seeds = (list(entry.get(key, ft[key])) for key in FINETUNE_GRID_KEYS)
    unknown = [i for i in inits if i != "none" and i not in PRETRAIN_METHODS]
    if unknown:
        raise WorkflowError(
            f"config finetune.inits (task {task}): {unknown} are not pretraining methods "
            f"({', '.join(PRETRAIN_METHODS)}) or none"
        )
    return inits, fractions, seeds


def finetune_run_dirs(task):
    """Every run folder of `task`."""
    inits, fractions, seeds = finetune_grid(task)
    return [
        f"{RESULTS}/finetune/{task}/{init}/{fraction_name(fraction)}/{seed}"
        for init in inits
        for fraction in fractions
        for seed in seeds
    ]


def finetune_targets(wildcards):
    """model.pt of every run of every task of the study."""
    return [f"{run}/model.pt" for task in config["finetune"]["tasks"] for run in finetune_run_dirs(task)]


def finetune_train_dataset(task):
    entry = config["finetune"]["tasks"][task]
    return entry.get("train_dataset") or entry["dataset"]


def finetune_settings(task):
    """Resolved settings of one task: study-wide keys, the task's keys on top (dicts merged one
    level deep), plus what the run needs from other sections. The grid lists are left out so that
    adding a seed or fraction does not re-run the existing runs; so are the job-layout keys."""
    ft = config["finetune"]
    merged = {k: v for k, v in ft.items() if k != "tasks" and k not in FINETUNE_GRID_KEYS + FINETUNE_JOB_KEYS}
    for key, value in ft["tasks"][task].items():
        if key in FINETUNE_GRID_KEYS:
            continue
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    if merged.get("label_groups"):
        # as_json sorts keys; a list of pairs keeps the class order of the config
        merged["label_groups"] = [[name, members] for name, members in merged["label_groups"].items()]
    train_dataset = finetune_train_dataset(task)
    merged["task"] = task
    merged["train_dataset"] = train_dataset
    merged["backbone"] = config["pretrain"].get("backbone", "resnet18")
    merged["ct_window"] = preprocess_settings(train_dataset)["ct_window"]
    merged.pop("real_images", None)  # the report's, not the run's: changing it retrains nothing
    merged["dataset_entry"] = finetune_dataset_entry(merged["dataset"])
    merged["train_dataset_entry"] = finetune_dataset_entry(train_dataset)
    return merged


def finetune_dataset_entry(dataset):
    """A dataset's config entry; simulated radiographs carry their source CT's (its label names)."""
    entry = dict(DATASETS[dataset])
    if entry.get("format") == "drr" and entry.get("source") in DATASETS:
        entry["source_entry"] = dict(DATASETS[entry["source"]])
    return entry


def finetune_inputs(wildcards):
    """Slice-store index/splits of the task's datasets and, unless init is none, the encoder."""
    task = wildcards.task
    dataset = config["finetune"]["tasks"][task]["dataset"]
    train_dataset = finetune_train_dataset(task)
    inputs = {
        "index": f"{RESULTS}/slices/{dataset}/index.json",
        "splits": f"{RESULTS}/slices/{dataset}/splits.json",
    }
    if train_dataset != dataset:
        inputs["train_index"] = f"{RESULTS}/slices/{train_dataset}/index.json"
        inputs["train_splits"] = f"{RESULTS}/slices/{train_dataset}/splits.json"
    if wildcards.init != "none":
        inputs["encoder"] = f"{RESULTS}/pretrain/{wildcards.init}/encoder.pt"
    return inputs


def finetune_args(wildcards, input):
    """Optional CLI arguments of `medclust finetune` (training store, encoder)."""
    args = []
    if "train_index" in input.keys():
        args += ["--train-slices", shlex.quote(str(Path(input.train_index).parent))]
    if "encoder" in input.keys():
        args += ["--encoder", shlex.quote(str(input.encoder))]
    return " ".join(args)


def finetune_seed_groups():
    """The seed groups that finetune_seeds runs in one job each, as {name of its rule -> (seeds,
    tasks, inits, fractions)}: only runs of the study grid, so a run asked for outside it (a
    `predict` block's model at another fraction, say) stays one finetune_run job.

    `finetune.seeds_per_job` > 1 groups consecutive seeds of a task's list (so appending seeds
    adds groups and leaves the existing jobs as they are); a group of one seed is left to
    finetune_run. Tasks with the same seeds, inits and fractions share the rules; the first
    group's rule is `finetune_seeds`, the next ones `finetune_seeds_2`, ...
    """
    size = int(config["finetune"].get("seeds_per_job", 1) or 1)
    groups = {}
    if size < 2:
        return groups
    for task in study_tasks():
        inits, fractions, seeds = finetune_grid(task)
        for start in range(0, len(seeds), size):
            chunk = tuple(int(s) for s in seeds[start : start + size])
            if len(chunk) > 1:
                key = (chunk, tuple(inits), tuple(fraction_name(f) for f in fractions))
                groups.setdefault(key, []).append(task)
    return {
        "finetune_seeds" if i == 0 else f"finetune_seeds_{i + 1}": (list(chunk), tasks, list(inits), list(fractions))
        for i, ((chunk, inits, fractions), tasks) in enumerate(groups.items())
    }


def finetune_seed_cells(wildcards, input, seeds):
    """`medclust finetune-many --cells`: one cell per seed of a finetune_seeds job (JSON)."""
    run = f"{RESULTS}/finetune/{wildcards.task}/{wildcards.init}/{wildcards.fraction}"
    logs = f"{RESULTS}/logs/finetune/{wildcards.task}/{wildcards.init}/{wildcards.fraction}"
    cells = []
    for seed in seeds:
        cell = {"init": wildcards.init, "fraction": float(wildcards.fraction), "seed": int(seed),
                "out": f"{run}/{seed}", "log": f"{logs}/{seed}.log"}
        if "encoder" in input.keys():
            cell["encoder"] = str(input.encoder)
        cells.append(cell)
    return as_json({"cells": cells})


# --- fine-tuning helpers (end) -----------------------------------------------------------------


# --- pretraining helpers (begin) ---------------------------------------------------------------

# Keep in sync with medclust.train.recipes.pretrain_methods (tests/test_pretrain_methods.py checks).
PRETRAIN_METHODS = (
    "joint", "swav2d", "deepcluster2d", "simclr", "nnclr", "depict", "lnscc", "gedi",
    "joint-simclr", "joint-nnclr", "joint-depict", "joint-lnscc", "joint-gedi", "none",
)
# The options section of each 2D objective, by method; a run leaves the other sections out.
PRETRAIN_SECTIONS = {
    "deepcluster2d": "deepcluster", "simclr": "simclr", "nnclr": "nnclr", "depict": "depict",
    "lnscc": "lnscc", "gedi": "gedi",
}

# Settings only the joint method reads: the 2D methods run with schema defaults for them, and the
# keys are left out of their params, so tuning the 3D branch does not re-run the 2D baselines.
# Keep in sync with medclust.train.recipes.pretrain.THREE_D_KEYS (tests/test_pretrain.py checks).
PRETRAIN_3D_KEYS = (
    "w_intra", "w_inter", "w_mask", "warmup_2d_steps", "heads", "points", "layers", "k_3d",
    "mask_ratio", "mask_loss", "s_max", "batch_size_3d", "volume_size", "queue_length_3d",
    "volume_slices_in_2d",
)


def pretrain_datasets():
    """Datasets pretraining reads (config `pretrain.datasets`, default: every dataset)."""
    chosen = config["pretrain"].get("datasets") or list(DATASETS)
    unknown = [d for d in chosen if d not in DATASETS]
    if unknown:
        raise ValueError(f"config pretrain.datasets: {unknown} are not keys of `datasets`")
    return list(chosen)


def pretrain_method_settings(method):
    """What one method's run depends on: the `pretrain` section minus the method list, the dataset
    list (the stores are inputs), the 3D keys for 2D methods and the other objectives' option
    sections; plus the global seed."""
    drop = {"methods", "datasets"}
    joint = method == "joint" or method.startswith("joint-")
    if not joint:
        drop |= set(PRETRAIN_3D_KEYS)
    own = PRETRAIN_SECTIONS.get(method.removeprefix("joint-"))
    drop |= {section for section in PRETRAIN_SECTIONS.values() if section != own}
    settings = {k: v for k, v in config["pretrain"].items() if k not in drop}
    settings["seed"] = config["seed"]
    return settings


# Dataset keys the learning monitor reads (free labels): body region, structure groups and what
# resolves label names (an MSD path, label_names; a drr dataset's source).
PROBE_DATASET_KEYS = ("body_region", "probe_structures", "label_names", "format", "path", "source")


def pretrain_probe_datasets():
    """The `datasets` entries the learning monitor needs (pretraining datasets and drr sources)."""
    names = list(pretrain_datasets())
    names += [DATASETS[d]["source"] for d in names if DATASETS[d].get("source") in DATASETS]
    return {d: {k: DATASETS[d][k] for k in PROBE_DATASET_KEYS if k in DATASETS[d]} for d in dict.fromkeys(names)}


def pretrain_targets(wildcards):
    """The encoder of every configured method (config `pretrain.methods`)."""
    return [f"{RESULTS}/pretrain/{m}/encoder.pt" for m in config["pretrain"]["methods"]]


# --- pretraining helpers (end) -----------------------------------------------------------------


# --- prediction helpers (begin) ----------------------------------------------------------------

PREDICT_JOBS = config.get("predict") or {}
PREDICT_JOBS_PATTERN = "|".join(re.escape(name) for name in PREDICT_JOBS) or "(?!)"


def predict_settings(name):
    """One entry of the config `predict` block, with the schema defaults filled in."""
    job = dict(PREDICT_JOBS[name])
    job.setdefault("dicom_seg", False)
    job["on_bad_input"] = job.get("on_bad_input") or config["on_bad_input"]
    return job


def predict_weights(wildcards):
    """The package's model.pt: a fine-tuning run of this study is built first, like any input."""
    model = Path(PREDICT_JOBS[wildcards.job]["model"])
    folder = model.parent if model.name.endswith(".json") else model
    return str(folder / "model.pt")


def predict_args(wildcards):
    """`medclust predict` options of one job (inputs, policy, optional flags), shell-quoted."""
    job = predict_settings(wildcards.job)
    args = []
    for path in job["inputs"]:
        args += ["--input", shlex.quote(str(path))]
    args += ["--on-bad-input", job["on_bad_input"]]
    if job["dicom_seg"]:
        args.append("--dicom-seg")
    if job.get("modality"):
        args += ["--modality", job["modality"]]
    if job.get("batch_size"):
        args += ["--batch-size", str(int(job["batch_size"]))]
    return " ".join(args)


def predict_targets(wildcards):
    """predict.json of every job of the config `predict` block (empty without one)."""
    return [f"{RESULTS}/predict/{job}/predict.json" for job in PREDICT_JOBS]


# --- prediction helpers (end) ------------------------------------------------------------------

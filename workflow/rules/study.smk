# The study table (owned by the evaluation stage).
#   rule study_table  every run of a task -> {RESULTS}/study/{task}.csv
# Each run is scored by finetune_run itself (metrics.json + per_case.csv; a separate job would pay
# the torch + MONAI start-up once more per run); `medclust evaluate --run DIR` re-scores by hand.
# Statistics: medclust/evaluate/statistics.py (interval rule by design, verdicts; config `study`).
# Helpers (study_targets, task_runs, ...) live in common.smk (lint: no functions beside rules).


rule study_table:
    input:
        lambda wildcards: [f"{run}/metrics.json" for run in task_runs(wildcards.task)],
    output:
        report(
            f"{RESULTS}/study/{{task}}.csv",
            category="Study",
            subcategory="{task}",
            caption="../report/study_csv.rst",
            labels={"task": "{task}", "figure": "study table (CSV)"},
        ),
    params:
        settings=lambda wildcards: as_json(config["study"]),
    log:
        f"{RESULTS}/logs/study/{{task}}.log",
    resources:
        **rule_resources("study_table", threads=1, mem_mb=2000, runtime=30),
    threads: 1
    conda:
        MEDCLUST_ENV
    shell:
        "medclust study --task {wildcards.task:q} --runs {input:q} --out {output:q}"
        " --settings {params.settings:q} > {log:q} 2>&1"

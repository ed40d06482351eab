# Evaluation and the study table (owned by the evaluation stage).
#   rule evaluate     one fine-tuning run folder -> metrics.json + per_case.csv beside it
#   rule study_table  every run of a task        -> {RESULTS}/study/{task}.csv
# Statistics: medclust/evaluate/statistics.py (hierarchical + paired bootstrap, config `study`).
# Helpers (study_targets, task_runs, ...) live in common.smk (lint: no functions beside rules).


rule evaluate:
    input:
        model=f"{RESULTS}/finetune/{{task}}/{{init}}/{{fraction}}/{{seed}}/model.pt",
    output:
        metrics=f"{RESULTS}/finetune/{{task}}/{{init}}/{{fraction}}/{{seed}}/metrics.json",
        per_case=f"{RESULTS}/finetune/{{task}}/{{init}}/{{fraction}}/{{seed}}/per_case.csv",
    params:
        run=lambda wildcards, input: str(Path(input.model).parent),
        settings=lambda wildcards: as_json(config["study"]),
    log:
        f"{RESULTS}/logs/evaluate/{{task}}/{{init}}/{{fraction}}/{{seed}}.log",
    resources:
        **rule_resources("evaluate", threads=1, mem_mb=4000, runtime=30),
    threads: 1
    conda:
        MEDCLUST_ENV
    shell:
        "medclust evaluate --run {params.run:q} --settings {params.settings:q} > {log:q} 2>&1"


rule study_table:
    input:
        lambda wildcards: [f"{run}/metrics.json" for run in task_runs(wildcards.task)],
    output:
        report(
            f"{RESULTS}/study/{{task}}.csv",
            category="Study",
            subcategory="{task}",
            caption="../report/study_table.rst",
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

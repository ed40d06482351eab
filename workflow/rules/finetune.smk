# Fine-tuning: one run per {task}/{init}/{fraction}/{seed} (owned by the fine-tuning stage).
#   rule finetune_run  results/finetune/{task}/{init}/{fraction}/{seed}/model.pt (+ model.json, the
#                      model package with model.pt; run.json,
#                      metrics.json and per_case.csv (the test scores), predictions, val.csv,
#                      metrics.csv, provenance.json; checkpoint/ is not an output so that a
#                      pre-empted or killed run resumes; it holds the live metrics.csv, and
#                      metrics.csv in the run folder is written when training has finished)
# The target rule `finetune` (Snakefile) collects finetune_targets; helpers are in common.smk.


rule finetune_run:
    input:
        unpack(finetune_inputs),
    output:
        model=f"{RESULTS}/finetune/{{task}}/{{init}}/{{fraction}}/{{seed}}/model.pt",
        package=f"{RESULTS}/finetune/{{task}}/{{init}}/{{fraction}}/{{seed}}/model.json",
        run=f"{RESULTS}/finetune/{{task}}/{{init}}/{{fraction}}/{{seed}}/run.json",
        metrics=f"{RESULTS}/finetune/{{task}}/{{init}}/{{fraction}}/{{seed}}/metrics.json",
        per_case=f"{RESULTS}/finetune/{{task}}/{{init}}/{{fraction}}/{{seed}}/per_case.csv",
    params:
        settings=lambda wildcards: as_json(finetune_settings(wildcards.task)),
        slices=lambda wildcards, input: str(Path(input.index).parent),
        out=lambda wildcards, output: str(Path(output.model).parent),
        extra=finetune_args,
        launch=lambda wildcards, resources, threads: launch_prefix(resources, threads),
    log:
        f"{RESULTS}/logs/finetune/{{task}}/{{init}}/{{fraction}}/{{seed}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/finetune/{{task}}/{{init}}/{{fraction}}/{{seed}}.tsv"
    resources:
        **rule_resources("finetune", threads=1, mem_mb=6000, runtime=60, gpu=1),
    threads: rule_threads("finetune", 1)
    conda:
        MEDCLUST_ENV
    shell:
        "{params.launch}medclust finetune --settings {params.settings:q} --slices {params.slices:q}"
        " {params.extra} --init {wildcards.init:q} --fraction {wildcards.fraction}"
        " --seed {wildcards.seed} --threads {threads} --out {params.out:q} > {log:q} 2>&1"

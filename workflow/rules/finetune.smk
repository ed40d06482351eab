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


# Several seeds of one {task}/{init}/{fraction} in one job (config finetune.seeds_per_job > 1):
# `medclust finetune-many` runs them one after the other in one process, so the ~5-8 s start-up
# of a fine-tuning job (Python, torch, MONAI) is paid once per group instead of once per run
# (BENCHMARKS.md "Fine-tuning start-up"). Same run folders, files and results as finetune_run,
# each run's output in its own log; the group's own log holds what comes before and after them.
# finetune_seeds runs the first group of seeds, finetune_seeds_2 ... the next ones; a seed
# left alone in its group goes to finetune_run. With seeds_per_job: 1 (the default, a cluster)
# there is no such rule. Profiles set its resources under the name finetune_seeds.
FINETUNE_OUTPUT_FILES = ("model.pt", "model.json", "run.json", "metrics.json", "per_case.csv")

for _rule_name, (_seeds, _tasks, _inits, _fractions) in finetune_seed_groups().items():

    rule:
        name:
            _rule_name
        input:
            unpack(finetune_inputs),
        output:
            [
                f"{RESULTS}/finetune/{{task}}/{{init}}/{{fraction}}/{seed}/{name}"
                for seed in _seeds
                for name in FINETUNE_OUTPUT_FILES
            ],
        log:
            f"{RESULTS}/logs/finetune/{{task}}/{{init}}/{{fraction}}/seeds_{_seeds[0]}-{_seeds[-1]}.log",
            [f"{RESULTS}/logs/finetune/{{task}}/{{init}}/{{fraction}}/{seed}.log" for seed in _seeds],
        benchmark:
            f"{RESULTS}/benchmarks/finetune/{{task}}/{{init}}/{{fraction}}/seeds_{_seeds[0]}-{_seeds[-1]}.tsv"
        wildcard_constraints:
            task="|".join(re.escape(t) for t in _tasks),
            init="|".join(re.escape(i) for i in _inits),
            fraction="|".join(re.escape(f) for f in _fractions),
        params:
            settings=lambda wildcards: as_json(finetune_settings(wildcards.task)),
            slices=lambda wildcards, input: str(Path(input.index).parent),
            train=lambda wildcards, input: (
                f"--train-slices {shlex.quote(str(Path(input.train_index).parent))}" if "train_index" in input.keys() else ""
            ),
            cells=lambda wildcards, input, seeds=_seeds: finetune_seed_cells(wildcards, input, seeds),
            launch=lambda wildcards, resources, threads: launch_prefix(resources, threads),
        resources:
            **rule_resources("finetune", threads=1, mem_mb=6000, runtime=60 * len(_seeds), gpu=1),
        threads: rule_threads("finetune", 1)
        conda:
            MEDCLUST_ENV
        shell:
            "{params.launch}medclust finetune-many --settings {params.settings:q} --slices {params.slices:q}"
            " {params.train} --cells {params.cells:q} --threads {threads} > {log[0]:q} 2>&1"

    workflow.ruleorder(_rule_name, "finetune_run")

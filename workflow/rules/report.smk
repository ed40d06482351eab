# Figures registered with report() (owned by the evaluation stage); `snakemake --report report.html`
# collects them with the captions in workflow/report/. Every figure is drawn by a `medclust plot-*`
# command from metrics files, study tables, embeddings or predictions; the verdict tables by
# `medclust verdict-table` from the study tables.


rule plot_pretrain_loss:
    input:
        lambda wildcards: [f"{RESULTS}/pretrain/{m}/metrics.csv" for m in trained_methods()],
    output:
        report(
            f"{RESULTS}/report/pretrain_loss.png",
            category="Pretraining",
            subcategory="Loss curves",
            caption="../report/pretrain_loss.rst",
            labels={"figure": "loss curves"},
        ),
    log:
        f"{RESULTS}/logs/report/pretrain_loss.log",
    resources:
        **rule_resources("plot", threads=1, mem_mb=2000, runtime=10),
    threads: 1
    conda:
        MEDCLUST_ENV
    shell:
        "medclust plot-loss --metrics {input:q} --out {output:q} > {log:q} 2>&1"


rule plot_probe_curves:
    input:
        lambda wildcards: [f"{RESULTS}/pretrain/{m}/metrics.csv" for m in trained_methods()],
    output:
        report(
            f"{RESULTS}/report/probe_curves.png",
            category="Pretraining",
            subcategory="Loss curves",
            caption="../report/probe_curves.rst",
            labels={"figure": "probe curves"},
        ),
    log:
        f"{RESULTS}/logs/report/probe_curves.log",
    resources:
        **rule_resources("plot", threads=1, mem_mb=2000, runtime=10),
    threads: 1
    conda:
        MEDCLUST_ENV
    shell:
        "medclust plot-probes --metrics {input:q} --out {output:q} > {log:q} 2>&1"


rule plot_embeddings:
    input:
        f"{RESULTS}/pretrain/{{method}}/embeddings.npz",
    output:
        report(
            f"{RESULTS}/report/embeddings/{{method}}.png",
            category="Pretraining",
            subcategory="Embeddings",
            caption="../report/embeddings.rst",
            labels={"method": "{method}", "figure": "embedding map (PCA)"},
        ),
    log:
        f"{RESULTS}/logs/report/embeddings_{{method}}.log",
    resources:
        **rule_resources("plot", threads=1, mem_mb=2000, runtime=10),
    threads: 1
    conda:
        MEDCLUST_ENV
    shell:
        "medclust plot-embeddings --embeddings {input:q} --out {output:q} > {log:q} 2>&1"


rule plot_study:
    input:
        f"{RESULTS}/study/{{task}}.csv",
    output:
        curves=report(
            f"{RESULTS}/report/study/{{task}}_curves.png",
            category="Study",
            subcategory="{task}",
            caption="../report/study_curves.rst",
            labels={"task": "{task}", "figure": "metric vs label fraction"},
        ),
        table=report(
            f"{RESULTS}/report/study/{{task}}_table.png",
            category="Study",
            subcategory="{task}",
            caption="../report/study_table.rst",
            labels={"task": "{task}", "figure": "study table"},
        ),
        # the task's verdicts, embedded in both captions above (not a report item itself)
        verdicts=f"{RESULTS}/report/study/{{task}}_verdicts.html",
    log:
        f"{RESULTS}/logs/report/study_{{task}}.log",
    resources:
        **rule_resources("plot", threads=1, mem_mb=2000, runtime=10),
    threads: 1
    conda:
        MEDCLUST_ENV
    shell:
        "(medclust plot-study --table {input:q} --kind curves --out {output.curves:q}"
        " && medclust plot-study --table {input:q} --kind table --out {output.table:q}"
        " && medclust verdict-table --tables {input:q} --out {output.verdicts:q}) > {log:q} 2>&1"


# The verdicts of every task: the report's opening page embeds this table (workflow.rst).
rule verdict_table:
    input:
        lambda wildcards: [f"{RESULTS}/study/{task}.csv" for task in study_tasks()],
    output:
        report(
            f"{RESULTS}/report/verdicts.html",
            category="Verdicts",
            caption="../report/verdicts.rst",
            labels={"figure": "does pretraining help? (all tasks)"},
        ),
    log:
        f"{RESULTS}/logs/report/verdicts.log",
    resources:
        **rule_resources("plot", threads=1, mem_mb=2000, runtime=10),
    threads: 1
    conda:
        MEDCLUST_ENV
    shell:
        "medclust verdict-table --tables {input:q} --out {output:q} > {log:q} 2>&1"


# Every pretraining method side by side, for a study of three or more methods (report_targets in
# common.smk; the demo's joint-vs-none study has none): each encoder's clustering quality and
# probes (clustering.json of pretrain_method) and its fine-tuning verdicts from the study tables.
rule method_comparison:
    input:
        clustering=lambda wildcards: [f"{RESULTS}/pretrain/{m}/clustering.json" for m in report_methods()],
        study=lambda wildcards: [f"{RESULTS}/study/{task}.csv" for task in study_tasks()],
    output:
        csv=f"{RESULTS}/report/method_comparison.csv",
        html=report(
            f"{RESULTS}/report/method_comparison.html",
            category="Method comparison",
            caption="../report/method_comparison.rst",
            labels={"figure": "methods compared (table)"},
        ),
        png=report(
            f"{RESULTS}/report/method_comparison.png",
            category="Method comparison",
            caption="../report/method_comparison.rst",
            labels={"figure": "methods compared (figure)"},
        ),
    params:
        methods=lambda wildcards: report_methods(),
    log:
        f"{RESULTS}/logs/report/method_comparison.log",
    resources:
        **rule_resources("plot", threads=1, mem_mb=2000, runtime=10),
    threads: 1
    conda:
        MEDCLUST_ENV
    shell:
        "medclust method-comparison --clustering {input.clustering:q} --study {input.study:q}"
        " --methods {params.methods:q} --out-csv {output.csv:q} --out-html {output.html:q}"
        " --out-png {output.png:q} > {log:q} 2>&1"


rule plot_examples:
    input:
        example_inputs,
    output:
        report(
            f"{RESULTS}/report/examples/{{task}}.png",
            category="Examples",
            subcategory="{task}",
            caption="../report/examples.rst",
            labels={"task": "{task}", "figure": "test examples"},
        ),
    params:
        runs=lambda wildcards: example_runs(wildcards.task),
        kind=lambda wildcards: task_type(wildcards.task),
        slices=lambda wildcards: f"{RESULTS}/slices/{task_test_dataset(wildcards.task)}",
        n=lambda wildcards: config["study"]["example_slices"],
    log:
        f"{RESULTS}/logs/report/examples_{{task}}.log",
    resources:
        **rule_resources("plot", threads=1, mem_mb=4000, runtime=10),
    threads: 1
    conda:
        MEDCLUST_ENV
    shell:
        "medclust plot-examples --kind {params.kind} --runs {params.runs:q} --slices {params.slices:q}"
        " --n {params.n} --out {output:q} > {log:q} 2>&1"


# --- a model trained on simulated images, applied to real ones (task key `real_images`) -------


rule predict_real_images:
    input:
        model=lambda wildcards: f"{real_image_run(wildcards.task)}/model.pt",
        cases=lambda wildcards: f"{RESULTS}/cases/{real_image_tasks()[wildcards.task]}.json",
    output:
        summary=f"{RESULTS}/report/real_images/{{task}}/predict.json",
    params:
        model=lambda wildcards: real_image_run(wildcards.task),
        inputs=lambda wildcards: shlex.quote(DATASETS[real_image_tasks()[wildcards.task]]["path"]),
        spacing=lambda wildcards: " ".join(
            ["--assume-pixel-spacing"] + [str(v) for v in DATASETS[real_image_tasks()[wildcards.task]]["assume_pixel_spacing"]]
        ) if DATASETS[real_image_tasks()[wildcards.task]].get("assume_pixel_spacing") else "",
        out=lambda wildcards, output: str(Path(output.summary).parent),
    log:
        f"{RESULTS}/logs/report/real_images_{{task}}.log",
    resources:
        **rule_resources("predict", threads=1, mem_mb=8000, runtime=30, gpu=1),
    threads: 1
    conda:
        MEDCLUST_ENV
    shell:
        "medclust predict --model {params.model:q} --input {params.inputs} {params.spacing} --out {params.out:q}"
        " --threads {threads} --no-progress > {log:q} 2>&1"


rule plot_real_images:
    input:
        f"{RESULTS}/report/real_images/{{task}}/predict.json",
    output:
        report(
            f"{RESULTS}/report/real_images/{{task}}.png",
            category="Examples",
            subcategory="{task}",
            caption="../report/real_images.rst",
            labels={"task": "{task}", "figure": "real radiograph (model trained on simulated images only)"},
        ),
    params:
        model=lambda wildcards: real_image_run(wildcards.task),
        title=lambda wildcards: f"{wildcards.task}: trained on SIMULATED radiographs only, applied to a real one",
    log:
        f"{RESULTS}/logs/report/real_images_plot_{{task}}.log",
    resources:
        **rule_resources("plot", threads=1, mem_mb=2000, runtime=10),
    threads: 1
    conda:
        MEDCLUST_ENV
    shell:
        "medclust plot-radiograph --predicted {input:q} --model {params.model:q}"
        " --title {params.title:q} --out {output:q} > {log:q} 2>&1"

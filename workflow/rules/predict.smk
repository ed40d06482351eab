# Prediction with model packages (owned by the prediction stage), one job per entry of the
# optional config block `predict` (the target rule `predict` in the Snakefile collects them):
#   rule predict_job  results/predict/{job}/predict.json (+ {case}.nii.gz label maps on each
#                     input's grid and {case}.seg.dcm, or detections.csv, or probabilities.csv;
#                     provenance.json). A model that is a fine-tuning run of this study is built
#                     first (its model.pt is an input). Helpers are in common.smk.


rule predict_job:
    wildcard_constraints:
        job=PREDICT_JOBS_PATTERN,
    input:
        model=predict_weights,
        inputs=lambda wildcards: predict_settings(wildcards.job)["inputs"],
    output:
        summary=f"{RESULTS}/predict/{{job}}/predict.json",
    params:
        model=lambda wildcards, input: str(Path(input.model).parent),
        out=lambda wildcards, output: str(Path(output.summary).parent),
        args=predict_args,
    log:
        f"{RESULTS}/logs/predict/{{job}}.log",
    resources:
        **rule_resources("predict", threads=1, mem_mb=8000, runtime=60, gpu=1),
    threads: rule_threads("predict", 1)
    conda:
        MEDCLUST_ENV
    shell:
        "medclust predict --model {params.model:q} {params.args} --out {params.out:q}"
        " --threads {threads} --no-progress > {log:q} 2>&1"

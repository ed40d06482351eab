# Pretraining: one run per {method} (owned by the pretraining stage).
#   rule pretrain_method  results/pretrain/{method}/encoder.pt (+ model.json: with encoder.pt the
#                         encoder's model package; metrics.csv, embeddings.npz,
#                         provenance.json, clustering.json (NMI/ARI/Hungarian accuracy and probe
#                         scores against the free labels), slice_encoder.pt, tensorboard/). Its checkpoint/ folder is
#                         NOT an output: it survives a failed, pre-empted or killed job, and the rerun
#                         resumes from it ("resuming from step N" in the log); it also holds the live
#                         metrics.csv. The declared outputs are renamed into place together at the very
#                         end (medclust.io.atomic.publish_together): a job killed at any earlier point
#                         leaves none of them, so a plain rerun (no --rerun-incomplete) redoes it.
# The target rule `pretrain` (Snakefile) collects pretrain_targets; helpers are in common.smk.


wildcard_constraints:
    method="|".join(PRETRAIN_METHODS),


rule pretrain_method:
    input:
        index=lambda wildcards: [f"{RESULTS}/slices/{d}/index.json" for d in pretrain_datasets()],
        splits=lambda wildcards: [f"{RESULTS}/slices/{d}/splits.json" for d in pretrain_datasets()],
    output:
        encoder=f"{RESULTS}/pretrain/{{method}}/encoder.pt",
        package=f"{RESULTS}/pretrain/{{method}}/model.json",
        metrics=f"{RESULTS}/pretrain/{{method}}/metrics.csv",
        embeddings=f"{RESULTS}/pretrain/{{method}}/embeddings.npz",
        provenance=f"{RESULTS}/pretrain/{{method}}/provenance.json",
        clustering=f"{RESULTS}/pretrain/{{method}}/clustering.json",
    params:
        settings=lambda wildcards: as_json(pretrain_method_settings(wildcards.method)),
        datasets=lambda wildcards: as_json(pretrain_probe_datasets()),
        stores=lambda wildcards, input: [str(Path(p).parent) for p in input.index],
        out=lambda wildcards, output: str(Path(output.encoder).parent),
        checkpoint=lambda wildcards, output: str(Path(output.encoder).parent / "checkpoint"),
        launch=lambda wildcards, resources, threads: launch_prefix(resources, threads),
    log:
        f"{RESULTS}/logs/pretrain/{{method}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/pretrain/{{method}}.tsv"
    resources:
        **rule_resources("pretrain", threads=2, mem_mb=8000, runtime=120, gpu=1),
    # method none trains nothing (it embeds with the random encoder): on one thread it runs as
    # soon as a core is free, instead of waiting for two at the end of the demo
    threads: lambda wildcards: 1 if wildcards.method == "none" else rule_threads("pretrain", 2)
    conda:
        MEDCLUST_ENV
    shell:
        "{params.launch}medclust pretrain --method {wildcards.method} --settings {params.settings:q}"
        " --stores {params.stores:q} --out {params.out:q} --checkpoint-dir {params.checkpoint:q}"
        " --datasets {params.datasets:q}"
        " --threads {threads} > {log:q} 2>&1"

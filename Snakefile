# medclust: preprocess -> joint 2D/3D contrastive clustering pretraining -> fine-tuning study -> report
#   snakemake --cores 2                 everything (the default target `all`)
#   snakemake --cores 2 data            stop after the slice store and QC tables
#   snakemake --cores 2 pretrain | finetune | study
#   snakemake --cores 2 predict         the jobs of the config block `predict` (model packages on new images)
from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config.yaml"


validate(config, "workflow/schemas/config.schema.yaml")


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/pretrain.smk"
include: "workflow/rules/finetune.smk"
include: "workflow/rules/study.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/predict.smk"


rule all:
    default_target: True
    input:
        data_targets,
        pretrain_targets,
        finetune_targets,
        study_targets,


rule data:
    input:
        data_targets,


rule pretrain:
    input:
        pretrain_targets,


rule finetune:
    input:
        finetune_targets,


rule study:
    input:
        study_targets,


rule predict:
    input:
        predict_targets,

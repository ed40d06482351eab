# medclust: preprocess -> joint 2D/3D contrastive clustering pretraining -> fine-tuning study -> report
#   snakemake --cores 2                 everything (the default target `all`)
#   snakemake --cores 2 data            stop after the slice store and QC tables
#   snakemake --cores 2 pretrain | finetune | study
#   snakemake --cores 2 predict         the jobs of the config block `predict` (model packages on new images)
#   snakemake --cores N --configfile my_study.yaml    your own study (start from config/template.yaml)
from snakemake.exceptions import WorkflowError
from snakemake.utils import min_version, validate

min_version("9.0")

# The demo study (config.yaml of the working directory) is the config of a plain `snakemake`.
# Files given with --configfile replace it rather than being merged into it, so a study runs
# exactly the datasets, methods and tasks it lists; layer on the demo by naming it:
# --configfile config.yaml config/gpu_study.yaml. `--config key=value` still applies on top.
if not workflow.overwrite_configfiles:

    configfile: "config.yaml"


# Fills every key a study leaves out from the schema defaults (top-level sections default to {},
# so defaults reach every nested key), exactly as medclust.config.validate_config does.
validate(config, "workflow/schemas/config.schema.yaml")

if not config.get("datasets") and not config.get("predict"):
    raise WorkflowError(
        "config: no `datasets`. Config files given with --configfile replace the demo config.yaml "
        "instead of extending it: list your datasets and tasks (start from config/template.yaml), "
        "or layer on the demo explicitly: --configfile config.yaml <your file>"
    )
config.setdefault("datasets", {})


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

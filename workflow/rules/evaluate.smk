# Evaluation and the study table (placeholder until it lands)


def study_targets(wildcards):
    return []

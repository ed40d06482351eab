# Fine-tuning: one run per {task}/{init}/{fraction}/{seed} (placeholder until it lands)


def finetune_targets(wildcards):
    return []

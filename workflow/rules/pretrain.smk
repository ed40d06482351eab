# Pretraining: one run per {method} (owned by the pretraining stage; placeholder until it lands)


def pretrain_targets(wildcards):
    return []

"""The synthetic data behind the objective tests: clusters hidden from raw k-means, views that differ in the nuisance."""

import numpy as np
import torch
from synthetic_clusters import INFORMATIVE, TinyEncoder, embedding_nmi, make_clusters, train_objective, two_views

from medclust.evaluate.clustering import kmeans_labels, normalized_mutual_info


def test_clusters_live_in_the_informative_dims_only():
    x, labels = make_clusters(seed=0)
    assert x.shape == (192, 16) and labels.shape == (192,) and np.bincount(labels).tolist() == [64, 64, 64]
    # the premise of every "NMI > 0.8 after 30 steps" test: raw features and an untrained
    # encoder do not show the clusters, the informative dims alone do
    assert normalized_mutual_info(labels, kmeans_labels(x, 3)) < 0.2
    assert embedding_nmi(TinyEncoder(16, 16), x, labels) < 0.2
    assert normalized_mutual_info(labels, kmeans_labels(x[:, :INFORMATIVE], 3)) > 0.9


def test_views_keep_the_signal_and_redraw_the_nuisance():
    x, _ = make_clusters(n_per_cluster=400, seed=1)
    x1, x2 = two_views(x, generator=torch.Generator().manual_seed(0), dropout=0.0)
    corr = [float(torch.corrcoef(torch.stack([x1[:, d], x2[:, d]]))[0, 1]) for d in range(x.shape[1])]
    assert min(corr[:INFORMATIVE]) > 0.9  # signal survives the augmentation
    assert max(corr[INFORMATIVE:]) < 0.7  # the nuisance differs between views (~0.5)
    # same generator state, same views; the clean batch is left alone
    a = two_views(x, generator=torch.Generator().manual_seed(3))
    b = two_views(x, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b)


def test_train_objective_passes_views_and_clean_batch():
    x, _ = make_clusters(n_per_cluster=4)
    w = torch.nn.Parameter(torch.ones(()))
    seen = []

    def step(x1, x2, clean):
        seen.append((x1.shape, x2.shape, clean is x))
        return (w - 3) ** 2

    losses = train_objective(step, [w], x, steps=5, lr=0.5)
    assert len(losses) == 5 and losses[-1] < losses[0]
    assert seen[0] == (x.shape, x.shape, True)

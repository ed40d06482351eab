"""The pretraining method names: which 2D objective a method trains and whether it adds the 3D branch.

A method is a 2D objective, optionally in its *joint* form (the 2D objective as L_intra plus our
3D agreement and masked-slice objectives), so a study can separate what the 3D branch adds from
what the 2D objective adds:

============== ================== =======================================================
method         2D objective       what it is
============== ================== =======================================================
joint          swav               ours: SwAV 2D + 3D agreement + masked slices
swav2d         swav               SwAV (Caron et al., NeurIPS 2020) alone
deepcluster2d  deepcluster        DeepCluster-v2 (Caron et al., NeurIPS 2020)
simclr         simclr             SimCLR (Chen et al., ICML 2020)
nnclr          nnclr              NNCLR (Dwibedi et al., ICCV 2021)
depict         depict             DEPICT (Ghasedi Dizaji et al., ICCV 2017)
lnscc          lnscc              LNSCC (Ma & Kim, IJCAI 2022)
gedi           gedi               GEDI (Sansone & Manhaeve)
joint-<m>      m                  the 2D objective m plus our 3D objectives
none           (none)             the seeded random initialisation, not trained
============== ================== =======================================================

DeepCluster-v2 has no joint form: its epoch-wise re-clustering of a memory bank and the 3D
branch's per-step volume views do not share a schedule worth comparing.
"""

from __future__ import annotations

from medclust.errors import MedclustError

__all__ = [
    "JOINT_OBJECTIVES",
    "METHODS",
    "OBJECTIVES",
    "OBJECTIVE_SECTIONS",
    "cluster_head",
    "is_joint",
    "objective_of",
]

#: 2D objectives by the name of their own method
OBJECTIVES = {
    "swav2d": "swav",
    "deepcluster2d": "deepcluster",
    "simclr": "simclr",
    "nnclr": "nnclr",
    "depict": "depict",
    "lnscc": "lnscc",
    "gedi": "gedi",
}
#: 2D objectives that also run in a ``joint-<method>`` form (``joint`` itself is the SwAV one)
JOINT_OBJECTIVES = ("simclr", "nnclr", "depict", "lnscc", "gedi")
METHODS = ("joint", *OBJECTIVES, *(f"joint-{m}" for m in JOINT_OBJECTIVES), "none")
#: the settings section each objective reads (besides the shared keys); other methods' runs do not
#: depend on it (workflow/rules/common.smk leaves it out of their params, as it does THREE_D_KEYS)
OBJECTIVE_SECTIONS = {
    "deepcluster": "deepcluster",
    "simclr": "simclr",
    "nnclr": "nnclr",
    "depict": "depict",
    "lnscc": "lnscc",
    "gedi": "gedi",
}
#: objectives whose model assigns clusters itself (prototype scores); the others are clustered by
#: k-means on their embeddings for the clustering metrics
_CLUSTER_HEADS = ("swav", "deepcluster", "depict", "lnscc", "gedi")


def _check(method: str) -> None:
    if method not in METHODS:
        raise MedclustError(f"pretrain: unknown method {method!r}; choose one of {', '.join(METHODS)}")


def is_joint(method: str) -> bool:
    """Whether ``method`` trains our 3D objectives besides its 2D one (``joint``, ``joint-<m>``)."""
    _check(method)
    return method == "joint" or method.startswith("joint-")


def objective_of(method: str) -> str | None:
    """The 2D objective of ``method`` (``swav``, ``simclr``, ...); None for ``none``.

    Raises:
        MedclustError: unknown method.
    """
    _check(method)
    if method == "none":
        return None
    if method == "joint":
        return "swav"
    return OBJECTIVES[method.removeprefix("joint-")]


def cluster_head(method: str) -> bool:
    """Whether the method's own cluster assignments are its prototype argmax (else k-means)."""
    return objective_of(method) in _CLUSTER_HEADS

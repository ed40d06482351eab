"""Pretraining objectives, one per module: a pure function plus a thin nn.Module each."""

from medclust.losses.agreement3d import Agreement3DLoss, agreement3d_loss
from medclust.losses.deepcluster import DeepClusterLoss, MemoryBank, deepcluster_loss, spherical_kmeans
from medclust.losses.depict import DEPICTLoss, depict_loss, depict_target
from medclust.losses.gedi import GEDILoss, cluster_energy, energy_loss, gedi_discriminative_loss, sgld_sample
from medclust.losses.lnscc import LNSCCLoss, lnscc_loss
from medclust.losses.masked import MaskedEmbeddingLoss, masked_embedding_loss
from medclust.losses.nnclr import NNCLRLoss, nearest_neighbours, nnclr_loss
from medclust.losses.simclr import NTXentLoss, nt_xent_loss
from medclust.losses.sinkhorn import Sinkhorn, is_distributed, sinkhorn
from medclust.losses.swav import SwAVLoss, swapped_prediction_loss, swav_loss

__all__ = [
    "Agreement3DLoss",
    "DEPICTLoss",
    "DeepClusterLoss",
    "GEDILoss",
    "LNSCCLoss",
    "MaskedEmbeddingLoss",
    "MemoryBank",
    "NNCLRLoss",
    "NTXentLoss",
    "Sinkhorn",
    "SwAVLoss",
    "agreement3d_loss",
    "cluster_energy",
    "deepcluster_loss",
    "depict_loss",
    "depict_target",
    "energy_loss",
    "gedi_discriminative_loss",
    "is_distributed",
    "lnscc_loss",
    "masked_embedding_loss",
    "nearest_neighbours",
    "nnclr_loss",
    "nt_xent_loss",
    "sgld_sample",
    "sinkhorn",
    "spherical_kmeans",
    "swapped_prediction_loss",
    "swav_loss",
]

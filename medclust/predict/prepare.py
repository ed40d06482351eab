"""Read and preprocess a new input exactly as the model's training slice store was made.

The data stage's own functions do the work: :func:`medclust.preprocess.ingest.check_case` reads
the input with :mod:`medclust.io.readers` and runs the QC checks, and
:func:`medclust.preprocess.pipeline.preprocess_image` orients, resamples, normalises and slices
it with the ``preprocess`` settings recorded in the package. A CT model trained in
``ct_normalization: nnunet`` mode carries its dataset's fingerprint (clip range, mean, std) in
the recorded normalisation, and that fingerprint, not one of the new image, is applied. The
result is rounded to the store's dtype (float16 by default), as the training images were when
they were read back from the store.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medclust.errors import BadInputError, MedclustError
from medclust.io.readers import ImageData
from medclust.io.sources import CaseEntry, normalise_modality
from medclust.predict.package import PACKAGE_FILE, ModelPackage

__all__ = ["InputPreparer", "PreparedInput"]


@dataclass
class PreparedInput:
    """One input after reading and preprocessing.

    Attributes:
        entry: the input case (``case_id`` names the outputs).
        image: the image as read (its grid is the output grid).
        modality: the modality used for normalisation.
        slices: ``(S, H, W)`` float32, what a slice-store case would hold.
        attrs: slice-store style attrs (``store_affine``, ``original_affine``, ``original_shape``,
            ``slice_axis``, ``z_positions_mm``, ``target_spacing``, ``normalisation``).
    """

    entry: CaseEntry
    image: ImageData
    modality: str
    slices: np.ndarray
    attrs: dict[str, Any] = field(default_factory=dict)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """(slice, row, col) voxel size of ``slices`` in mm."""
        norms = np.linalg.norm(np.asarray(self.attrs["store_affine"])[:3, :3], axis=0)
        axis = int(self.attrs["slice_axis"])
        rest = [a for a in range(3) if a != axis]
        return float(norms[axis]), float(norms[rest[0]]), float(norms[rest[1]])


class InputPreparer:
    """The preprocessing of one model package, applied to new inputs.

    Args:
        package: the model package (its single training dataset's preprocessing is used).

    Raises:
        MedclustError: the recorded settings are not valid preprocess settings.
    """

    def __init__(self, package: ModelPackage) -> None:
        from medclust.preprocess.pipeline import PreprocessSettings

        self.package = package
        self.prep = package.preprocessing
        if not isinstance(self.prep.get("settings"), dict):
            raise MedclustError(
                f"{package.folder / PACKAGE_FILE}: no preprocessing settings recorded (the training slice store "
                "predates them); rerun its preprocessing and fine-tuning"
            )
        try:
            self.settings = PreprocessSettings.from_dict(self.prep["settings"])
        except MedclustError as err:
            raise MedclustError(f"{package.folder / PACKAGE_FILE}: {err}") from err
        self.trained = [str(m) for m in self.prep.get("modalities") or []]

    def _modality(self, entry: CaseEntry, image: ImageData, forced: str | None) -> str:
        if forced:
            return forced
        header = image.modality
        if header is not None and self.trained and header not in self.trained:
            raise BadInputError(
                entry.image, f"modality {header} (from the file header), but the model was trained on "
                f"{', '.join(self.trained)}; use --modality to override"
            )
        modality = header or entry.modality or (self.trained[0] if len(self.trained) == 1 else None)
        if modality is None:
            raise BadInputError(entry.image, f"modality unknown: give --modality (the model was trained on {', '.join(self.trained) or 'unknown'})")
        return modality

    def _intensity(self, modality: str) -> Any:
        record = (self.prep.get("normalisation") or {}).get(modality) or {}
        if record.get("method") != "nnunet":
            return None
        from medclust.preprocess.intensity import IntensityFingerprint

        return IntensityFingerprint.from_dict(record, where=str(self.package.folder / PACKAGE_FILE))

    def prepare(self, entry: CaseEntry, modality: str | None = None) -> PreparedInput:
        """Read, QC and preprocess one input.

        Args:
            entry: the input.
            modality: force CT/MR/XR (default: the DICOM header, else the entry's, else the
                model's training modality).

        Returns:
            The preprocessed input.

        Raises:
            BadInputError: unreadable, not 2D/3D, non-finite, constant, or of another modality.
        """
        from medclust.preprocess.ingest import check_case
        from medclust.preprocess.pipeline import preprocess_image

        forced = normalise_modality(modality) if modality else None
        fallback = forced or entry.modality or (self.trained[0] if len(self.trained) == 1 else None)
        probe = CaseEntry(
            entry.case_id,
            entry.image,
            modality=fallback,
            series_uid=entry.series_uid,
            assume_spacing=entry.assume_spacing,
            error=entry.error,
        )
        try:
            image, _ = check_case(probe)
        except BadInputError as err:
            if fallback is None and err.reason.startswith("modality unknown"):
                raise BadInputError(entry.image, f"modality unknown: give --modality (the model was trained on {', '.join(self.trained) or 'unknown'})") from err
            raise
        used = self._modality(entry, image, forced)
        intensity = self._intensity(used)
        extra = {"intensity": intensity} if intensity is not None else {}
        result = preprocess_image(image, used, self.settings, **extra)
        dtype = self.prep.get("store_dtype") or self.settings.dtype
        slices = np.asarray(result.image, dtype=dtype).astype(np.float32)
        attrs = {
            "case_id": entry.case_id,
            "modality": used,
            "source_path": str(entry.image),
            "original_shape": list(image.shape),
            "original_affine": np.asarray(image.affine, dtype=np.float64),
            "store_affine": result.store_affine,
            "target_spacing": result.target_spacing,
            "slice_axis": result.slice_axis,
            "z_positions_mm": result.z_positions_mm,
            "normalisation": result.normalisation,
        }
        return PreparedInput(entry=entry, image=image, modality=used, slices=slices, attrs=attrs)

"""Compiled CPU kernels (plain C, built on first use, cached) for what PyTorch ops do slowly."""

from medclust.models.native.build import cache_dir, load_library, native_enabled
from medclust.models.native.slice_sampling import (
    native_sampling_available,
    native_sampling_supports,
    sample_slices_native,
)

__all__ = [
    "cache_dir",
    "load_library",
    "native_enabled",
    "native_sampling_available",
    "native_sampling_supports",
    "sample_slices_native",
]

"""medclust: joint 2D/3D intra-inter contrastive clustering for medical images."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("medclust")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

from medclust.errors import MedclustError

__all__ = ["MedclustError", "__version__"]

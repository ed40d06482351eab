"""Readers and writers: images, manifests, the HDF5 slice store, atomic writes."""

from medclust.io.atomic import atomic_path, write_json_atomic, write_text_atomic
from medclust.io.readers import ImageData, image_kind, load_image
from medclust.io.slice_store import SliceCase, read_attrs, read_case, write_case
from medclust.io.sources import CaseEntry, discover, read_manifest

__all__ = [
    "CaseEntry",
    "ImageData",
    "SliceCase",
    "atomic_path",
    "discover",
    "image_kind",
    "load_image",
    "read_attrs",
    "read_case",
    "read_manifest",
    "write_case",
    "write_json_atomic",
    "write_text_atomic",
]

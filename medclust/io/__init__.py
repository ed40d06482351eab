"""Readers and writers: images, manifests, the HDF5 slice store, atomic writes."""

from medclust.io.atomic import atomic_path, write_json_atomic, write_text_atomic

__all__ = ["atomic_path", "write_json_atomic", "write_text_atomic"]

"""Case ids: file-name safe, unique within a dataset, and stable.

An id is made from a file or folder name (or a manifest's ``case_id``): accents are
transliterated (``Müller`` -> ``Muller``) and anything else outside ``[A-Za-z0-9._-]`` becomes
``_``, so ids work as file names and Snakemake wildcards. Different names can collapse to one id
(``病例一`` and ``病例二`` both give ``case``); then each such case gets six hex digits of a hash
of its own name appended, which depends only on that name: ids neither collide nor change with
the order of the cases.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from medclust.io.sources import CaseEntry


def sanitize_case_id(name: str) -> str:
    """Turn a file or folder name into a case id usable in file names and wildcards.

    Accented letters are transliterated (``Müller`` -> ``Muller``); anything else outside
    ``[A-Za-z0-9._-]`` becomes ``_``. Different names can give one id: see
    :func:`make_case_ids_unique`.
    """
    decomposed = unicodedata.normalize("NFKD", name)
    ascii_name = "".join(c for c in decomposed if not unicodedata.combining(c))
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", ascii_name).strip("._-")
    return cleaned or "case"


def name_hash(name: str) -> str:
    """Six hex digits identifying ``name`` (Unicode-normalised, so one name always gives one hash)."""
    return hashlib.sha256(unicodedata.normalize("NFC", name).encode("utf-8")).hexdigest()[:6]


def make_case_ids_unique(entries: Sequence[CaseEntry]) -> None:
    """Give cases whose different names collapsed to one id an id of their own, in place.

    Within a group of equal ids made from more than one distinct name, every case whose name is
    not already exactly the id gets ``_<name_hash>`` appended. The result depends only on the
    names involved, not on the order of the cases. Cases with identical names are left alone
    (ingest reports them as duplicates).
    """
    groups: dict[str, list[CaseEntry]] = {}
    for entry in entries:
        groups.setdefault(entry.case_id, []).append(entry)
    for case_id, group in groups.items():
        # NFC: macOS spells "ü" as u + combining diaeresis; one name either way
        names = {unicodedata.normalize("NFC", e.source_name if e.source_name is not None else case_id) for e in group}
        if len(names) < 2:
            continue
        for entry in group:
            name = unicodedata.normalize("NFC", entry.source_name if entry.source_name is not None else case_id)
            if name != case_id:
                entry.case_id = f"{case_id}_{name_hash(name)}"


__all__ = ["make_case_ids_unique", "name_hash", "sanitize_case_id"]

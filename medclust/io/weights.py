"""Load a ``torch.save``-d file of weights safely, failing with one line that names the file.

``torch.load(..., weights_only=True)`` refuses a pickle that would import arbitrary Python
objects (a tampered or foreign ``encoder.pt`` could otherwise run code), but it says so in a
multi-paragraph ``UnpicklingError``; a truncated file gives a ``PytorchStreamReader`` runtime
error, an empty one a bare ``EOFError``. :func:`load_weights_file` turns each into a
:class:`~medclust.errors.BadInputError`: ``path: reason``.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
from typing import Any

from medclust.errors import BadInputError
from medclust.io.image import path_problem


def load_weights_file(path: str | os.PathLike[str], what: str = "weights") -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)`` with one-line errors.

    Args:
        path: a file written by ``torch.save`` (state dict or checkpoint of tensors and plain
            Python values).
        what: what the file is, for the message (``"encoder weights"``, ``"checkpoint"``).

    Returns:
        The loaded object.

    Raises:
        BadInputError: missing, empty, truncated, not a PyTorch file, or refused because it holds
            Python objects other than tensors and plain values.
    """
    import torch

    problem = path_problem(path)
    if problem is not None:
        raise BadInputError(path, f"{what}: {problem}")
    if os.path.getsize(path) == 0:
        raise BadInputError(path, f"{what}: empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols before refusing
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        detail = f"it would import {found.group(1)}" if found else "it holds Python objects other than tensors"
        raise BadInputError(
            path,
            f"refused to load {what}: {detail}, and loading such a file can run arbitrary code "
            "(use weights written by medclust or torch.save of a plain state dict)",
        ) from err
    except (RuntimeError, EOFError, KeyError, ValueError, OSError, IndexError, TypeError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0].split(". ")[0]
        raise BadInputError(path, f"cannot load {what}: truncated or not a PyTorch file ({first or type(err).__name__})") from err


__all__ = ["load_weights_file"]

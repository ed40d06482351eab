"""The one exception type the command line turns into a single readable line."""


class MedclustError(Exception):
    """A user-facing failure: bad input, bad config, or an unrecoverable training state.

    The message must name the offending file (or config key) and the reason, because the CLI
    prints only ``str(error)`` unless ``--verbose`` is given.
    """


class BadInputError(MedclustError):
    """One input case cannot be used (unreadable, wrong dimensionality, non-finite, ...).

    Args:
        path: the file or folder that is bad.
        reason: why, in a few words.
    """

    def __init__(self, path: object, reason: str) -> None:
        self.path = str(path)
        # One line whatever a library put in its message: the QC table is a TSV and the CLI
        # prints one line per error.
        self.reason = " ".join(str(reason).split())
        super().__init__(f"{self.path}: {self.reason}")


class DiskFullError(MedclustError):
    """A write failed because the file system (or the user's quota) is full.

    Raised with nothing partial left behind (atomic writes remove their temporary file), so the
    fix is always: free space, then rerun the same command.

    Args:
        path: the file or folder that could not be written.
        quota: the quota, not the device, is full (``EDQUOT``).
    """

    def __init__(self, path: object, quota: bool = False) -> None:
        self.path = str(path)
        what = "disk quota exceeded" if quota else "no space left on device"
        super().__init__(f"{self.path}: {what} (nothing partial was kept; free space and rerun)")

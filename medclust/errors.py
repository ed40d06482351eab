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

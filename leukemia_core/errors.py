"""User-facing errors: each names the file or setting at fault and the fix.

The CLI turns any :class:`LeukemiaError` into one message and exit code 2.
"""


class LeukemiaError(Exception):
    """Base class for errors caused by bad input rather than by a bug."""


class DataRootError(LeukemiaError):
    """The data root is missing or lacks a dataset folder."""


class DatasetError(LeukemiaError):
    """A dataset file is malformed, corrupt or inconsistent."""


class UnknownNameError(LeukemiaError):
    """An unknown dataset, class, model or profile name was given."""


class CheckpointError(LeukemiaError):
    """A checkpoint is unreadable or does not fit the task it is used for."""

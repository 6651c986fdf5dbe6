"""Every exception dltrain raises on purpose, in one place, by who can act on it.

The command line turns a `UserError` into one `dltrain: error:` line and exit 2, a `TrainingError`
into `dltrain: training stopped:` and exit 3, and `Preempted` into exit 4 (dltrain.cli). Each
message is one line that names the problem and the way out.
"""

from __future__ import annotations


class UserError(Exception):
    """Something the user can fix before running again: input, options, the disk."""


class RecipeError(UserError):
    """A recipe, profile or override the user can fix. The message is one line."""


class DataError(UserError):
    """Data the user must provide or fix. The message says where we looked and what to do."""


class LaunchError(UserError, ValueError):
    """Launch options that cannot work together; the message says which and what to do."""


class StorageError(UserError):
    """A write that failed for want of space or permission; nothing already saved was lost, and
    the message names what is intact and how to continue."""


class TrainingError(Exception):
    """Training cannot go on (e.g. non-finite loss); the message says where and what to do."""


class Preempted(Exception):
    """A signal asked the run to stop; a checkpoint was written. The CLI exits with code 4."""

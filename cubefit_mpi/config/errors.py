"""Exception types that decide the process exit code.

``InputError`` (exit 2) is raised for anything the user can fix: a missing or malformed
dataset, a bad option, an environment knob that does not parse.  Its message is one line that
names the dataset/argument and says what was expected.  Everything else is an internal error
(exit 1).
"""


class InputError(Exception):
    """Bad input or usage: one clear line naming the dataset/option, exit code 2."""

    exit_code = 2


class KnobError(InputError):
    """A ``CUBEFIT_*`` environment variable is unknown or does not parse."""


class ConsistencyError(RuntimeError):
    """A result failed its own independent check (e.g. χ² recomputed from the data disagrees with
    the normal equations): one line naming both values, exit code 1, nothing wrong written."""

    exit_code = 1


class WriteFailure(RuntimeError):
    """Writing a file failed (disk full, quota, I/O error): exit code 1, with what is still valid.

    The HDF5 file is abandoned, not closed (closing a file whose writes failed can crash the
    HDF5 library); the process ends at once after printing the message.  ``everywhere=True``
    says every rank raised it together (then rank 0 alone prints it).
    """

    exit_code = 1

    def __init__(self, message: str, *, everywhere: bool = False):
        super().__init__(message)
        self.everywhere = everywhere

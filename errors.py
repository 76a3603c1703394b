"""Error types with stable codes: every user-facing failure is one line, never a traceback."""

import errno


class MedblipError(Exception):
    """A failure the user can act on. `code` is stable and machine-readable."""

    code = "error"

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code

    def __str__(self) -> str:  # one line, always
        return " ".join(str(self.args[0]).split())

    def as_json(self) -> dict:
        return {"code": self.code, "message": str(self)}


class ScanError(MedblipError):
    """A scan that cannot be turned into a model input (bad file, bad header, bad data)."""

    code = "scan_error"


class CheckpointError(MedblipError):
    """A checkpoint that cannot be loaded safely or completely."""

    code = "checkpoint_error"


class BundleError(MedblipError):
    """A bundle whose manifest or files cannot be trusted."""

    code = "bundle_error"


class BackendUnavailable(MedblipError):
    """A requested backend whose software or hardware is missing here."""

    code = "backend_unavailable"


class DiskFull(MedblipError):
    """The disk (or the user's quota) filled up while a command was writing."""

    code = "disk_full"


def disk_full(e: OSError, writing=None) -> DiskFull | None:
    """The one-line error for a write that ran out of space, naming the file (or else `writing`, what the command
    was writing); None for any other OSError (those stay bugs)."""
    if e.errno not in (errno.ENOSPC, errno.EDQUOT):
        return None
    where = e.filename or writing
    where = f" while writing {where}" if where else ""
    return DiskFull(f"no space left on the device{where}: free some space or write to another disk")

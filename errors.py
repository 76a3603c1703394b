"""Error types with stable codes: every user-facing failure is one line, never a traceback."""


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

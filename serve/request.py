"""What both upload forms share: the HTTP refusal and the multipart part-header collector."""

from __future__ import annotations

from ..errors import MedblipError


class RequestError(MedblipError):
    """A request the server refuses before any scan is read: `status` is its HTTP status."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message, code=code)
        self.status = status


class PartSink:
    """python-multipart callbacks that collect each part's headers; a subclass handles the parts themselves
    (headers_done, data, end)."""

    def __init__(self):
        self.headers: dict[bytes, bytes] = {}
        self.field = self.value = b""
        self.complete = False  # the closing boundary was read

    def callbacks(self) -> dict:
        return {"on_part_begin": self.begin, "on_header_field": self.header_field, "on_header_value": self.header_value,
                "on_header_end": self.header_end, "on_headers_finished": self.headers_done,
                "on_part_data": self.data, "on_part_end": self.end, "on_end": self.done}

    def done(self):
        self.complete = True

    def begin(self):
        self.headers, self.field, self.value = {}, b"", b""

    def header_field(self, data, start, end):
        self.field += data[start:end]

    def header_value(self, data, start, end):
        self.value += data[start:end]

    def header_end(self):
        self.headers[self.field.lower()] = self.value
        self.field = self.value = b""

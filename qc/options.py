"""What a run does about input quality: which conform step (and who chose it) and whether failed checks stop a scan."""

from __future__ import annotations

from dataclasses import dataclass

from .conform import ConformSpec

# manifest key holding the conform spec a site trained with (medblip-export --conform)
MANIFEST_KEY = "conform"


@dataclass(frozen=True)
class QcOptions:
    conform: ConformSpec = ConformSpec()
    conform_from: str = "default"  # "default" (the published loader alone), "bundle" (its manifest), "option"
    strict: bool = False  # --strict-qc: a scan failing a check gets an error row (qc_failed)

    @classmethod
    def for_bundle(cls, manifest: dict, conform: str | None = None, strict: bool = False) -> "QcOptions":
        """`conform` None: the bundle's recorded spec if it has one, else none; else the spec given (`none` too)."""
        if conform is not None:
            return cls(ConformSpec.parse(conform), "option", strict)
        recorded = manifest.get(MANIFEST_KEY)
        if recorded:
            return cls(ConformSpec.parse(recorded), "bundle", strict)
        return cls(ConformSpec(), "default", strict)

    def row(self) -> dict:
        """The row's `conform` field: the spec applied (`none`: the published loader alone) and where it came from."""
        return {"spec": str(self.conform), "from": self.conform_from}

    def as_dict(self) -> dict:
        return {"conform": str(self.conform), "conform_from": self.conform_from, "strict": self.strict}

    @classmethod
    def from_dict(cls, d: dict) -> "QcOptions":
        return cls(ConformSpec.parse(d["conform"]), d["conform_from"], bool(d["strict"]))

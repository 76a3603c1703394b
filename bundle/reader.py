"""Reading a bundle: manifest.json + artifacts, each checked against its SHA-256 before use."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import BundleError
from ..model.config import MedBlipConfig
from ..model.tokenizer import TextTokenizer
from .format import MANIFEST, SCHEMA_VERSION, TOKENIZER, sha256_file


@dataclass
class Bundle:
    """A verified bundle folder. `artifacts` maps name -> manifest entry ({"files": [...], "sha256": {...}, ...})."""

    root: Path
    manifest: dict

    @classmethod
    def open(cls, root: str | Path, verify: bool = True) -> "Bundle":
        root = Path(root)
        mpath = root / MANIFEST
        if not mpath.is_file():
            raise BundleError(f"{root.name}: no {MANIFEST} (not a medblip-edge bundle)", code="not_a_bundle")
        try:
            manifest = json.loads(mpath.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BundleError(f"{MANIFEST}: not valid JSON ({e})", code="bad_manifest")
        version = manifest.get("schema_version")
        if version != SCHEMA_VERSION:
            older = isinstance(version, int) and version < SCHEMA_VERSION
            raise BundleError(f"{MANIFEST}: {'older' if older else 'unknown'} schema_version {version!r} (this runtime "
                              f"reads {SCHEMA_VERSION})" + ("; export the bundle again with this medblip-export"
                                                            if older else ""), code="unknown_schema")
        bundle = cls(root, manifest)
        if verify:
            bundle.verify()
        return bundle

    def verify(self) -> None:
        """Every listed file exists with its recorded SHA-256; no unlisted file sits among the artifacts."""
        listed = {MANIFEST}
        for name, art in self.artifacts.items():
            for rel, digest in art["sha256"].items():
                listed.add(rel)
                p = self.root / rel
                if not p.is_file():
                    raise BundleError(f"{rel}: missing from the bundle (artifact {name})", code="missing_file")
                if sha256_file(p) != digest:
                    raise BundleError(f"{rel}: SHA-256 does not match the manifest (modified or corrupt)",
                                      code="hash_mismatch")
        extra = sorted(str(p.relative_to(self.root)) for p in self.root.rglob("*")
                       if p.is_file() and str(p.relative_to(self.root)) not in listed)
        if extra:
            raise BundleError(f"{extra[0]}: file not listed in the manifest" +
                              (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""), code="extra_file")

    @property
    def artifacts(self) -> dict:
        return self.manifest["artifacts"]

    @property
    def config(self) -> MedBlipConfig:
        return MedBlipConfig.from_dict(self.manifest["model"]["config"])

    @property
    def random_weights(self) -> bool:
        return bool(self.manifest["random_weights"])

    def has(self, artifact: str) -> bool:
        return artifact in self.artifacts

    def path(self, artifact: str, role: str = "main") -> Path:
        """File of an artifact; `role` picks one of several (e.g. an ONNX graph vs its external data)."""
        try:
            return self.root / self.artifacts[artifact]["files"][role]
        except KeyError:
            raise BundleError(f"bundle has no {artifact} artifact ({role})", code="missing_artifact")

    def tokenizer(self) -> TextTokenizer:
        entry = self.artifacts[TOKENIZER]
        return TextTokenizer.load(self.path(TOKENIZER), entry["clean_up_tokenization_spaces"])

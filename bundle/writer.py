"""Write a bundle into a temporary folder and move it into place only when complete."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from .format import MANIFEST, SCHEMA_VERSION, sha256_file


class BundleWriter:
    """`with BundleWriter(out) as w: ...; w.add(...)` -> `out` appears whole, or not at all."""

    def __init__(self, out: Path):
        self.out = Path(out).resolve()
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.partial-", dir=self.out.parent))
        self.artifacts: dict[str, dict] = {}

    def __enter__(self) -> "BundleWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def path(self, rel: str) -> Path:
        p = self.tmp / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def add(self, name: str, main: str, extra: dict[str, str] | None = None, **meta) -> dict:
        """Register artifact `name` whose files already sit in the temp folder; hashes them. `main` may be a folder."""
        files = {"main": main, **(extra or {})}
        sha = {}
        for rel in files.values():
            p = self.tmp / rel
            for f in sorted(p.rglob("*")) if p.is_dir() else [p]:
                if f.is_file():
                    sha[str(f.relative_to(self.tmp))] = sha256_file(f)
        entry = {"files": files, "sha256": sha,
                 "bytes": sum((self.tmp / r).stat().st_size for r in sha), **meta}
        self.artifacts[name] = entry
        return entry

    def commit(self, manifest: dict) -> dict:
        """Write manifest.json, then swap the finished folder into place (the old bundle goes only after)."""
        manifest = {"schema_version": SCHEMA_VERSION, **manifest, "artifacts": self.artifacts}
        (self.tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
        old = None
        if self.out.exists():
            old = self.out.with_name(f".{self.out.name}.old-{os.getpid()}")
            os.replace(self.out, old)
        os.replace(self.tmp, self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return manifest

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

    def copy_from(self, source, skip: tuple[str, ...] = ()) -> None:
        """Every artifact of `source` (a bundle.reader.Bundle) but those in `skip`, into this bundle: its files
        hard-linked where the file system allows (bundles are never modified in place), else copied, then hashed
        again and registered with their manifest keys; a file that changed while copied is an error."""
        from ..errors import BundleError

        for name, entry in source.artifacts.items():
            if name in skip:
                continue
            for rel in entry["sha256"]:
                dst = self.path(rel)
                try:
                    os.link(source.root / rel, dst)
                except OSError:
                    shutil.copy2(source.root / rel, dst)
            files = dict(entry["files"])
            main = files.pop("main")
            meta = {k: v for k, v in entry.items() if k not in ("files", "sha256", "bytes")}
            if self.add(name, main, files or None, **meta)["sha256"] != entry["sha256"]:
                raise BundleError(f"artifact {name} changed while it was copied", code="hash_mismatch")

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

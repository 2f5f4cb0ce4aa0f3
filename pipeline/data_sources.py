"""Data sources that are artifacts: `--data labels:latest` reads the labels artifact's file of the right kind.

A stage's data setting names a file, a Hub dataset, or an artifact: `<stage>:latest`, an artifact id,
or an artifact folder. `data_file` turns an artifact reference into its payload file for the record
kind the stage reads (a `labels` artifact holds all three) and leaves anything else as it is, so the
stage resolves the reference once, when it starts, and reads and records that same file even if a newer
artifact is published meanwhile. `data_input` is the manifest's input record for what was read: a file
inside an artifact folder names that artifact, so the lineage runs from the stage's artifact to the
labels artifact to the checkpoints that generated the completions.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from pipeline.datasets import Kind
from pipeline.store import MANIFEST, ArtifactStore, StoreError, dataset_fingerprint

PAYLOAD_FILES: dict[str, str] = {
    "conversation": "conversations.jsonl",
    "comparison": "comparisons.jsonl",
    "prompt": "prompts.jsonl",
}
# `<stage>-<yyyymmdd>-<hhmmss>-<microseconds>-<random>`, as pipeline.store.new_artifact_id writes them.
ARTIFACT_ID = re.compile(r"^[\w-]+-\d{8}-\d{6}-\d{6}-[0-9a-f]{4}$")


def is_artifact_reference(source: str) -> bool:
    """`<stage>:latest`, an artifact id, or a folder (local or a URL) holding a manifest."""
    if Path(source).is_file():
        return False
    if source.endswith(":latest") or ARTIFACT_ID.match(source) or "://" in source:
        return True
    return Path(source).is_dir() and (Path(source) / MANIFEST).is_file()


def data_file(source: str | None, kind: Kind, store: ArtifactStore) -> str | None:
    """The file to read for `source`: an artifact's payload file of `kind`, or `source` unchanged."""
    if source is None or not is_artifact_reference(source):
        return source
    artifact = store.resolve(source)
    name = PAYLOAD_FILES[kind]
    if name not in artifact.manifest.get("files", {}):
        held = (
            ", ".join(n for n in PAYLOAD_FILES.values() if n in artifact.manifest.get("files", {})) or "none"
        )
        raise StoreError(
            f"artifact {artifact.id} ({artifact.stage}) has no {name}, so it holds no {kind} records "
            f"(data files it holds: {held}); name a labels artifact that has them, or a data file"
        )
    return str(store.local_path(artifact) / name)


def data_input(path: str) -> dict[str, Any]:
    """The manifest input for a data file: the artifact it belongs to, its content hash, or its name."""
    if not Path(path).is_file():
        return {"dataset": path}  # a Hub dataset
    fingerprint = dataset_fingerprint(path)
    manifest = Path(path).parent / MANIFEST
    if manifest.is_file():
        artifact_id = json.loads(manifest.read_text(encoding="utf-8"))["id"]
        return {"artifact": artifact_id, "file": Path(path).name, "sha256": fingerprint["sha256"]}
    return fingerprint

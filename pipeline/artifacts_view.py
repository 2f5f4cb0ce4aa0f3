"""Text for `rlhf artifacts ls` and `rlhf artifacts show`: pure functions from artifacts to strings."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import yaml

from pipeline.store import Artifact, ArtifactStore

LIST_METRICS = 3  # stages put their headline metrics first in the manifest; `ls` shows that many
SHORT_SHA = 12


def render_list(artifacts: list[Artifact]) -> str:
    """A table of artifacts, one a row: id, stage, creation time and the first few metrics."""
    if not artifacts:
        return "no artifacts"
    table = [("ID", "STAGE", "CREATED (UTC)", "METRICS")]
    table += [
        (a.id, a.stage, format_time(a.manifest.get("created", "")), key_metrics(a.metrics)) for a in artifacts
    ]
    # Pad every column but the last (metrics vary in length and end the line).
    widths = [max(len(row[col]) for row in table) for col in range(3)]
    lines = []
    for row in table:
        padded = [cell.ljust(width) for cell, width in zip(row[:3], widths, strict=True)]
        lines.append("  ".join([*padded, row[3]]).rstrip())
    return "\n".join(lines)


def render_show(store: ArtifactStore, artifact: Artifact) -> str:
    """Everything about one artifact: identity, lineage tree, metrics, meta and the resolved config."""
    manifest = artifact.manifest
    lines = [
        f"id:            {artifact.id}",
        f"stage:         {artifact.stage}",
        f"created:       {format_time(manifest.get('created', ''))} UTC",
        f"code version:  {manifest.get('code_version', 'unknown')}",
        f"location:      {artifact.uri}",
        "lineage:",
        *lineage_lines(store.lineage(artifact), depth=1),
        "metrics:" + ("" if artifact.metrics else " none"),
        *(f"  {name}: {format_value(value)}" for name, value in artifact.metrics.items()),
    ]
    if artifact.meta:
        lines += ["meta:", indent_yaml(artifact.meta)]
    lines += ["config:" + ("" if manifest.get("config") else " none")]
    if manifest.get("config"):
        lines.append(indent_yaml(manifest["config"]))
    return "\n".join(lines)


def lineage_lines(node: dict[str, Any], depth: int) -> list[str]:
    """The lineage dict of `ArtifactStore.lineage` as an indented tree, parents below their child."""
    pad = "  " * depth
    role = f"  as {node['role']}" if node.get("role") else ""
    if node.get("missing"):
        return [f"{pad}{node['id']}  (not in this store){role}"]
    lines = [f"{pad}{node['id']}  [{node['stage']}]{role}"]
    for item in node["inputs"]:
        if "id" in item:
            lines += lineage_lines(item, depth + 1)
        else:
            lines.append(f"{pad}  {external_input(item)}")
    return lines


def external_input(item: dict[str, Any]) -> str:
    """A dataset or model file recorded by path (and hash): `dataset data/x.jsonl  sha256:0123abcd4567`."""
    kind, where = next(((k, v) for k, v in item.items() if k not in ("sha256", "role")), ("input", ""))
    sha = item.get("sha256", "")[:SHORT_SHA]
    role = f"  as {item['role']}" if item.get("role") else ""
    return f"{kind} {where}" + (f"  sha256:{sha}" if sha else "") + role


def key_metrics(metrics: dict[str, Any]) -> str:
    scalars = [(k, v) for k, v in metrics.items() if isinstance(v, (int, float, str, bool))]
    return "  ".join(f"{name}={format_value(value, digits=4)}" for name, value in scalars[:LIST_METRICS])


def format_value(value: Any, digits: int = 6) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def format_time(created: str) -> str:
    """`2026-01-02T03:04:05.678901+00:00` as `2026-01-02 03:04:05`; anything unparsable as written."""
    try:
        return f"{datetime.fromisoformat(created):%Y-%m-%d %H:%M:%S}"
    except ValueError:
        return created


def indent_yaml(data: dict[str, Any]) -> str:
    text = yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True).rstrip()
    return "\n".join(f"  {line}" for line in text.splitlines())

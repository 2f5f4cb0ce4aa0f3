"""`rlhf artifacts rm` and `rlhf artifacts gc`: what may go from a store, and going there safely.

The rules, in the order they are checked:

- An artifact another artifact was built from (an `{"artifact": id}` input) is kept while that one is:
  `rm` refuses and names the dependants; `--with-dependants` removes them too, dependants first, so a
  killed `rm` never leaves an artifact whose parent is gone.
- An artifact the label database references (completions it generated, arena models) is never removed:
  the references come in as a mapping of artifact id to descriptions, which the refusal quotes.
- `gc` removes artifacts older than `keep_days` that nothing kept depends on and that are not the newest
  of their stage (`stage:latest` keeps resolving), repeating until nothing more qualifies; the
  checkpoints of finished runs (those in an artifact's run folder, `meta.run_dir`, older than the
  artifact: written by the run that published it); and folders named like artifacts that have no
  manifest (a killed publish or remove) once nothing has been written in them for `unfinished_age`
  (another machine may still be uploading one).
- Run folders hold the curves the app plots: they go only with `with_runs`, and only a run folder that
  no kept artifact also records.

`ArtifactStore.remove` deletes the manifest first, on a local folder and on S3 alike.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Literal

from pipeline.store import Artifact, ArtifactStore, StoreError, cache_folder

UNFINISHED_AGE = timedelta(hours=6)
CHECKPOINT_PREFIXES = ("checkpoint-", ".tmp-checkpoint-")


@dataclass(frozen=True)
class Item:
    """One thing to remove."""

    kind: Literal["artifact", "unfinished", "checkpoint", "run"]
    name: str
    """Artifact id, folder name under the store root, or the absolute path of a local folder."""
    size: int
    """Bytes it frees."""
    note: str = ""


@dataclass
class Plan:
    """What `rm` or `gc` removes, in the order it is removed."""

    items: list[Item] = field(default_factory=list)

    @property
    def size(self) -> int:
        return sum(item.size for item in self.items)


def dependants_of(artifacts: list[Artifact]) -> dict[str, list[str]]:
    """Artifact id -> ids of the artifacts that name it as an input."""
    children: dict[str, list[str]] = {a.id: [] for a in artifacts}
    for artifact in artifacts:
        for item in artifact.manifest.get("inputs", []):
            if "artifact" in item:
                children.setdefault(item["artifact"], []).append(artifact.id)
    return children


def plan_rm(
    store: ArtifactStore,
    ref: str,
    *,
    references: Mapping[str, list[str]],
    with_dependants: bool = False,
    with_runs: bool = False,
) -> Plan:
    """Removing `ref` (and, with `with_dependants`, everything built from it); refuses as the rules say."""
    target = store.resolve(ref)
    store.get(target.id)  # an artifact of this store, not a folder elsewhere
    artifacts = store.list()
    children = dependants_of(artifacts)
    doomed = [target.id]
    for artifact_id in doomed:  # grows while it is walked: every dependant, transitively
        doomed += [child for child in children.get(artifact_id, []) if child not in doomed]
    by_id = {a.id: a for a in artifacts}
    if len(doomed) > 1 and not with_dependants:
        named = ", ".join(f"{i} ({by_id[i].stage})" for i in doomed[1:])
        raise StoreError(
            f"cannot remove {target.id}: {named} depend on it; remove those first or add --with-dependants"
        )
    refuse_referenced(doomed, references)
    removed = [by_id[i] for i in reversed(doomed)]  # dependants before what they were built from
    kept = [a for a in artifacts if a.id not in doomed]
    return Plan(artifact_items(store, removed) + (run_items(removed, kept) if with_runs else []))


def refuse_referenced(artifact_ids: list[str], references: Mapping[str, list[str]]) -> None:
    held = [i for i in artifact_ids if references.get(i)]
    if held:
        what = "; ".join(f"{i}: {', '.join(references[i])}" for i in held)
        raise StoreError(f"cannot remove what the label database references ({what}); those labels need them")


def plan_gc(
    store: ArtifactStore,
    *,
    references: Mapping[str, list[str]],
    keep_days: float,
    with_runs: bool = False,
    now: datetime | None = None,
    unfinished_age: timedelta = UNFINISHED_AGE,
) -> Plan:
    """Old artifacts nothing needs, checkpoints of finished runs, and unfinished folders gone quiet."""
    now = now or datetime.now(timezone.utc)
    artifacts = store.list()
    newest = {a.stage: a.id for a in artifacts}  # list() is oldest first
    children = dependants_of(artifacts)
    cutoff = now - timedelta(days=keep_days)
    removed: list[Artifact] = []
    while True:
        gone = {a.id for a in removed}
        more = [
            a
            for a in artifacts
            if a.id not in gone
            and created(a) < cutoff
            and newest[a.stage] != a.id
            and not references.get(a.id)
            and all(child in gone for child in children.get(a.id, []))
        ]
        if not more:
            break
        removed += more
    kept = [a for a in artifacts if a not in removed]
    items = artifact_items(store, removed)
    items += run_items(removed, kept) if with_runs else []
    runs_going = {item.name for item in items if item.kind == "run"}
    items += checkpoint_items([a for a in artifacts if a.meta.get("run_dir") not in runs_going])
    for name in store.unfinished():
        written = store.last_written(name)
        if now - written >= unfinished_age:
            note = f"no manifest, last written {written:%Y-%m-%d %H:%M} UTC"
            items.append(Item("unfinished", name, store.folder_size(name), note))
    return Plan(items)


def created(artifact: Artifact) -> datetime:
    return datetime.fromisoformat(artifact.manifest["created"])


def artifact_items(store: ArtifactStore, artifacts: list[Artifact]) -> list[Item]:
    return [Item("artifact", a.id, store.folder_size(a.id), a.stage) for a in artifacts]


def run_items(removed: list[Artifact], kept: list[Artifact]) -> list[Item]:
    """The run folders of removed artifacts that no kept artifact also records (a PPO run name reused)."""
    still_used = {a.meta.get("run_dir") for a in kept}
    items = []
    for artifact in removed:
        run_dir = artifact.meta.get("run_dir")
        if run_dir and run_dir not in still_used and is_run_folder(Path(run_dir)):
            items.append(Item("run", run_dir, folder_bytes(Path(run_dir)), f"run of {artifact.id}"))
            still_used.add(run_dir)
    return items


def checkpoint_items(artifacts: list[Artifact]) -> list[Item]:
    """Checkpoints in each artifact's run folder written before the artifact: its run has finished with them."""
    items = []
    for artifact in artifacts:
        run_dir = artifact.meta.get("run_dir")
        if not run_dir or not Path(run_dir).is_dir():
            continue  # recorded on another machine, or already removed
        published = created(artifact).timestamp()
        for folder in sorted(Path(run_dir).iterdir()):
            if (
                folder.is_dir()
                and folder.name.startswith(CHECKPOINT_PREFIXES)
                and newest_mtime(folder) < published
            ):
                items.append(Item("checkpoint", str(folder), folder_bytes(folder), f"run of {artifact.id}"))
    return items


def is_run_folder(path: Path) -> bool:
    """A folder a stage could have made: not a root, home, the working directory or one of their parents."""
    path = path.resolve()
    guarded = [Path.cwd().resolve(), Path.home().resolve()]
    return path.is_dir() and len(path.parts) > 2 and not any(path == g or path in g.parents for g in guarded)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def newest_mtime(folder: Path) -> float:
    return max([p.stat().st_mtime for p in folder.rglob("*")] + [folder.stat().st_mtime])


def execute(store: ArtifactStore, plan: Plan) -> None:
    """Remove the plan's items in order; a remote artifact's local download goes with it."""
    for item in plan.items:
        if item.kind == "artifact":
            store.remove(item.name)
            if not store.is_local:
                shutil.rmtree(cache_folder() / item.name, ignore_errors=True)
        elif item.kind == "unfinished":
            store.remove_folder(item.name)
        else:
            shutil.rmtree(item.name)


def render_plan(plan: Plan, *, dry_run: bool) -> str:
    """One line per item, then the total: what `rm`/`gc` prints before removing anything."""
    if not plan.items:
        return "nothing to remove"
    width = max(len(item.name) for item in plan.items)
    lines = [
        f"  {item.kind:<10}  {item.name:<{width}}  {human_size(item.size):>9}  {item.note}".rstrip()
        for item in plan.items
    ]
    verb = "would free" if dry_run else "frees"
    return "\n".join([*lines, f"{verb} {human_size(plan.size)} ({len(plan.items)} items)"])


def human_size(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"

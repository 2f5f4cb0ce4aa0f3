"""The artifact store: stages publish folders here and later stages resolve them.

Layout under the root (a local folder or any fsspec URL such as `s3://bucket/prefix`):

    <root>/<artifact-id>/manifest.json   written last; a folder without it is not an artifact
    <root>/<artifact-id>/...             the payload (model weights, tokenizer, data files)

An artifact id is `<stage>-<UTC timestamp>-<random>`, so ids sort by time within a stage.
Publishing to a local root builds the folder under a hidden temporary name (`.tmp-<id>`) and renames it
into place, so a crash never leaves a half-artifact; on object stores the manifest is uploaded in one
request after every payload file, so a reader never sees an artifact whose payload is incomplete.
Readers ignore hidden folders and folders without a manifest (what a killed publisher leaves behind).

Pointing the store at S3, MinIO or any S3-compatible server (s3fs, installed with the `s3` extra):

    AWS_ACCESS_KEY_ID=...  AWS_SECRET_ACCESS_KEY=...      credentials, as for any AWS client
    AWS_ENDPOINT_URL_S3=http://minio:9000                  a non-AWS endpoint (botocore reads it)
    rlhf artifacts ls --store s3://bucket/prefix

`AWS_ENDPOINT_URL` works too (botocore reads both when s3fs creates its client, and s3fs keeps that
client for the process, so set them before the first store is opened), as does fsspec's own
configuration: `FSSPEC_S3_ENDPOINT_URL=...` or `FSSPEC_S3='{"endpoint_url": "...", "key": "...",
"secret": "..."}'` in the environment (read when fsspec is imported), or in Python
`fsspec.config.conf["s3"] = {"endpoint_url": ...}`. (Tested with s3fs 2026.9 against moto's server.)

Reading a remote artifact's payload (`local_path`) downloads it once into `$RLHF_CACHE/<id>`
(default `~/.cache/rlhf-pipeline/artifacts`), checking every file against the manifest's sha256.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pipeline.errors import UserError

MANIFEST = "manifest.json"
CACHE_ENV = "RLHF_CACHE"
STAGING_PREFIX = ".tmp-"
# What an artifact's folder is named, published or being published: `<stage>-<time>-<random>`, or
# `.tmp-` and that while a local publish copies it. Nothing else under the root is ever removed as unfinished.
ARTIFACT_FOLDER = re.compile(r"(\.tmp-)?[A-Za-z0-9_-]+-\d{8}-\d{6}-\d{6}-[0-9a-f]{4}")


STORE_ENV = "RLHF_STORE"


def default_store_root() -> str:
    """The store a stage uses when its config names none: $RLHF_STORE, else ./artifacts."""
    return os.environ.get(STORE_ENV, "artifacts")


class StoreError(UserError, LookupError):
    """An artifact reference that cannot be resolved, or a store that cannot be written."""


@dataclass(frozen=True)
class Artifact:
    """A published artifact: its manifest and where its payload lives (a local path or a URL)."""

    id: str
    stage: str
    uri: str
    manifest: dict[str, Any]

    @property
    def metrics(self) -> dict[str, Any]:
        return self.manifest.get("metrics", {})

    @property
    def meta(self) -> dict[str, Any]:
        return self.manifest.get("meta", {})


def new_artifact_id(stage: str, now: datetime | None = None) -> str:
    """`<stage>-<UTC time to the microsecond>-<random>`: unique, and sorting by time within a stage."""
    now = now or datetime.now(timezone.utc)
    return f"{stage}-{now:%Y%m%d-%H%M%S-%f}-{secrets.token_hex(2)}"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def dataset_fingerprint(path: str | Path) -> dict[str, str]:
    """An input record for a data file: its path and content hash, for the manifest's lineage."""
    path = Path(path)
    return {"dataset": str(path), "sha256": file_sha256(path)}


def code_version() -> str:
    """The git commit of the running code (`-dirty` with uncommitted changes), else the package version."""
    checkout = Path(__file__).resolve().parents[1]
    if (checkout / ".git").exists():  # only our own checkout, not a repository the package is installed in
        # GIT_OPTIONAL_LOCKS=0: `git status` must not take the index lock from someone committing meanwhile.
        env = os.environ | {"GIT_OPTIONAL_LOCKS": "0"}
        git = ["git", "-C", str(checkout)]
        try:
            head = subprocess.run(
                [*git, "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=10
            )
            status = subprocess.run(
                [*git, "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                timeout=10,
                env=env,
            )
            if head.returncode == 0:
                return head.stdout.strip() + ("-dirty" if status.stdout.strip() else "")
        except (OSError, subprocess.TimeoutExpired):
            pass
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("rlhf-pipeline")
    except PackageNotFoundError:
        return "unknown"


def check_stage_name(stage: str) -> None:
    # The stage starts the artifact id and comes before `:latest` in references, so it must be a plain word.
    if not stage or stage.startswith(".") or any(c in stage for c in "/\\: "):
        raise StoreError(f"invalid stage name {stage!r}: use letters, digits, '-' or '_'")


def check_artifact_id(artifact_id: str) -> None:
    # An id names one folder directly under the root: refuse anything that would reach elsewhere.
    if not artifact_id or artifact_id.startswith(".") or "/" in artifact_id or "\\" in artifact_id:
        raise StoreError(f"invalid artifact id {artifact_id!r}")


def load_manifest(fs: fsspec.AbstractFileSystem, path: str) -> dict[str, Any]:
    """The parsed manifest at `path`; FileNotFoundError when there is none."""
    raw = fs.cat_file(path)
    try:
        manifest = json.loads(raw)
    except json.JSONDecodeError as err:
        raise StoreError(f"{path}: manifest is not valid JSON ({err}); the store is corrupt") from None
    if not isinstance(manifest, dict) or "id" not in manifest:
        raise StoreError(f"{path}: manifest has no artifact id; the store is corrupt")
    return manifest


def manifest_text(manifest: dict[str, Any]) -> str:
    # Insertion order is kept on purpose: a stage lists its headline metrics and config fields first.
    return json.dumps(manifest, indent=2)


def copy_durably(src: Path, dst: Path) -> None:
    """Copy a file and flush it to disk, so that a rename after it never exposes unwritten data."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        shutil.copyfileobj(fin, fout, 1 << 20)
        fout.flush()
        os.fsync(fout.fileno())
    shutil.copystat(src, dst)


def write_durably(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def is_url(ref: str) -> bool:
    return "://" in ref


def open_fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and its own path for a local path or fsspec URL."""
    try:
        # Several machines write a shared store, so a cached directory listing is always possibly stale:
        # s3fs would otherwise answer `exists`/`cat_file` from a listing taken before another publish.
        return fsspec.core.url_to_fs(url, use_listings_cache=False)
    except (ValueError, ImportError) as err:  # an unknown protocol, or its package is not installed
        raise StoreError(f"cannot open {url}: {err}") from None


def filesystem_errors() -> tuple[type[BaseException], ...]:
    """What a filesystem raises when a store cannot be reached, refuses the credentials or cannot be written:
    OSError, and botocore's connection errors, which s3fs lets through and which are not OSErrors."""
    try:
        from botocore.exceptions import BotoCoreError
    except ImportError:  # no s3fs installed, so no S3 store either
        return (OSError,)
    return (OSError, BotoCoreError)


def reported(method):
    """A store method whose filesystem errors end as one StoreError that names the store and the fix."""

    @functools.wraps(method)
    def wrapper(self: ArtifactStore, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except filesystem_errors() as err:
            detail = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
            if self.is_local:
                raise StoreError(f"cannot use store {self.root}: {detail}") from None
            if isinstance(err, PermissionError):
                raise StoreError(
                    f"store {self.root} refused access ({detail}); check the credentials (AWS_ACCESS_KEY_ID and "
                    "AWS_SECRET_ACCESS_KEY, or FSSPEC_S3) and that they may read and write there"
                ) from None
            raise StoreError(
                f"cannot reach store {self.root} ({detail}); check the URL, the endpoint (AWS_ENDPOINT_URL_S3 "
                "for S3-compatible servers) and the network"
            ) from None

    return wrapper


class ArtifactStore:
    """Publish and resolve artifacts under one root folder or fsspec URL."""

    def __init__(self, root: str | Path):
        self.root = str(root).rstrip("/")
        self.fs, self.base = open_fs(self.root)
        self.is_local = isinstance(self.fs, LocalFileSystem)

    def _path(self, artifact_id: str) -> str:
        """The artifact's folder as the filesystem names it (no protocol)."""
        return f"{self.base}/{artifact_id}"

    def uri(self, artifact_id: str) -> str:
        """Where the artifact lives: a local path for a local store, a full URL (`s3://...`) otherwise."""
        path = self._path(artifact_id)
        return path if self.is_local else self.fs.unstrip_protocol(path)

    # -- publishing -------------------------------------------------------------------------------

    @reported
    def publish(
        self,
        stage: str,
        payload_dir: str | Path,
        *,
        config: dict[str, Any],
        inputs: list[dict[str, Any]] | None = None,
        metrics: dict[str, Any] | None = None,
        meta: dict[str, Any] | None = None,
    ) -> Artifact:
        """Copy `payload_dir` into the store as a new artifact of `stage`, manifest last."""
        check_stage_name(stage)
        payload_dir = Path(payload_dir)
        if not payload_dir.is_dir():
            raise StoreError(f"cannot publish {payload_dir}: not a folder")
        now = datetime.now(timezone.utc)
        artifact_id = new_artifact_id(stage, now)
        # A payload that is itself an artifact folder (republishing a download) carries an old manifest.
        files = sorted(p for p in payload_dir.rglob("*") if p.is_file() and p != payload_dir / MANIFEST)
        manifest = {
            "id": artifact_id,
            "stage": stage,
            "created": now.isoformat(timespec="microseconds"),
            "config": config,
            "inputs": inputs or [],
            "metrics": metrics or {},
            "meta": meta or {},
            "files": {p.relative_to(payload_dir).as_posix(): file_sha256(p) for p in files},
            "code_version": code_version(),
        }
        text = manifest_text(manifest)  # before writing anything: a config that is not JSON fails here
        if self.is_local:
            self._publish_local(artifact_id, payload_dir, files, text)
        else:
            self._publish_remote(artifact_id, payload_dir, files, text)
        return Artifact(artifact_id, stage, self.uri(artifact_id), manifest)

    def _publish_local(self, artifact_id: str, payload_dir: Path, files: list[Path], text: str) -> None:
        root = Path(self.base)
        root.mkdir(parents=True, exist_ok=True)
        staging = root / f"{STAGING_PREFIX}{artifact_id}"
        staging.mkdir()
        try:
            for src in files:
                copy_durably(src, staging / src.relative_to(payload_dir))
            write_durably(staging / MANIFEST, text)
            os.rename(staging, root / artifact_id)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def _publish_remote(self, artifact_id: str, payload_dir: Path, files: list[Path], text: str) -> None:
        # Object stores have no rename: the manifest, one small object uploaded in a single request after
        # every payload file, is what makes the artifact visible.
        target = self._path(artifact_id)
        for src in files:
            self.fs.put_file(str(src), f"{target}/{src.relative_to(payload_dir).as_posix()}")
        self.fs.pipe_file(f"{target}/{MANIFEST}", text.encode("utf-8"))

    # -- reading ----------------------------------------------------------------------------------

    @reported
    def list(self, stage: str | None = None) -> list[Artifact]:
        """Published artifacts (those with a manifest), oldest first."""
        found = []
        for artifact_id in self._folder_names():
            # Ids start with their stage: skip other stages' manifests without fetching them.
            if stage is not None and not artifact_id.startswith(f"{stage}-"):
                continue
            try:
                manifest = load_manifest(self.fs, f"{self._path(artifact_id)}/{MANIFEST}")
            except (FileNotFoundError, NotADirectoryError):
                # A publish in progress, one killed before its manifest, or a plain file (the label database).
                continue
            if stage is None or manifest.get("stage") == stage:
                found.append(self._artifact(artifact_id, manifest))
        return sorted(found, key=lambda a: (a.manifest.get("created", ""), a.id))

    def _folder_names(self) -> list[str]:
        """Names of the visible folders directly under the root; none when the root does not exist yet."""
        try:
            entries = self.fs.ls(self.base, detail=False)
        except FileNotFoundError:
            return []
        names = (entry.rstrip("/").rsplit("/", 1)[-1] for entry in entries)
        return [name for name in names if not name.startswith(".")]

    def _artifact(self, artifact_id: str, manifest: dict[str, Any]) -> Artifact:
        return Artifact(artifact_id, manifest.get("stage", ""), self.uri(artifact_id), manifest)

    @reported
    def get(self, artifact_id: str) -> Artifact:
        check_artifact_id(artifact_id)
        try:
            manifest = load_manifest(self.fs, f"{self._path(artifact_id)}/{MANIFEST}")
        except FileNotFoundError:
            raise StoreError(
                f"no artifact {artifact_id!r} in store {self.root}; `rlhf artifacts ls --store {self.root}` lists them"
            ) from None
        return self._artifact(artifact_id, manifest)

    @reported
    def resolve(self, ref: str, stage: str | None = None) -> Artifact:
        """`latest` (newest of `stage`), `<stage>:latest`, an artifact id, or a path or URL of an artifact folder."""
        if ref.endswith(":latest"):
            named = ref[: -len(":latest")]
            if stage is not None and named != stage:
                raise StoreError(f"{ref!r} names a {named!r} artifact, but a {stage!r} one is needed")
            stage, ref = named, "latest"
        if ref == "latest":
            return self._latest(stage)
        if is_url(ref) or "/" in ref or os.sep in ref or Path(ref).is_dir():
            artifact = self._from_folder(ref)
        else:
            artifact = self.get(ref)
        if stage is not None and artifact.stage != stage:
            raise StoreError(
                f"artifact {artifact.id} is a {artifact.stage!r} artifact, but a {stage!r} one is needed"
            )
        return artifact

    def _latest(self, stage: str | None) -> Artifact:
        if stage is None:
            raise StoreError("`latest` needs a stage: write `<stage>:latest`, e.g. `sft:latest`")
        published = self.list(stage)
        if not published:
            raise StoreError(
                f"no published {stage!r} artifact in store {self.root}; run `rlhf {stage}` first "
                f"or name an artifact id or path"
            )
        return published[-1]

    def _from_folder(self, ref: str) -> Artifact:
        """An artifact named by the path or URL of its folder, which may lie outside this store."""
        fs, path = open_fs(ref.rstrip("/"))
        if path.rsplit("/", 1)[-1].startswith("."):
            raise StoreError(
                f"{ref} is a hidden folder (an unfinished publish), not a published artifact; "
                "`rlhf artifacts ls` lists the published ones"
            )
        try:
            manifest = load_manifest(fs, f"{path}/{MANIFEST}")
        except FileNotFoundError:
            raise StoreError(f"{ref} is not a published artifact folder: no {MANIFEST} there") from None
        uri = path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)
        return Artifact(manifest["id"], manifest.get("stage", ""), uri, manifest)

    @reported
    def local_path(self, artifact: Artifact) -> Path:
        """A local folder holding the artifact's files: the folder itself, or a verified cached download."""
        if not is_url(artifact.uri):
            return Path(artifact.uri)
        cache_root = cache_folder()
        target = cache_root / artifact.id
        if cached_manifest(target) == artifact.manifest:
            return target
        cache_root.mkdir(parents=True, exist_ok=True)
        staging = cache_root / f"{STAGING_PREFIX}{artifact.id}-{secrets.token_hex(4)}"
        try:
            download(artifact, staging)
            shutil.rmtree(target, ignore_errors=True)  # a stale or partial copy under the same id
            os.rename(staging, target)
        except OSError:
            # Another process finished the same download first: use its (equally verified) copy.
            shutil.rmtree(staging, ignore_errors=True)
            if cached_manifest(target) != artifact.manifest:
                raise
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return target

    # -- removing (pipeline/cleanup.py decides what; these do it) ----------------------------------

    def remove(self, artifact_id: str) -> None:
        """Delete a published artifact: its manifest first, then its payload.

        Without its manifest the folder is no artifact to `list` or `resolve`, so a remove killed midway
        leaves nothing a stage could pick up: only an unfinished folder, which `unfinished` lists.
        """
        check_artifact_id(artifact_id)
        self.fs.rm_file(f"{self._path(artifact_id)}/{MANIFEST}")
        self.remove_folder(artifact_id)

    def remove_folder(self, name: str) -> None:
        """Delete a folder directly under the root, manifest or not (an unfinished publish or remove)."""
        if not ARTIFACT_FOLDER.fullmatch(name):  # nothing else under the root is the store's to delete
            raise StoreError(f"{name!r} is not named like an artifact folder; not removing it")
        self.fs.rm(self._path(name), recursive=True)

    def unfinished(self) -> list[str]:
        """Folders named like artifacts (a local publish's hidden staging copy too) that have no manifest."""
        try:
            entries = self.fs.ls(self.base, detail=False)
        except FileNotFoundError:
            return []
        names = [entry.rstrip("/").rsplit("/", 1)[-1] for entry in entries]
        return [
            name
            for name in names
            if ARTIFACT_FOLDER.fullmatch(name) and not self.fs.exists(f"{self._path(name)}/{MANIFEST}")
        ]

    def folder_size(self, name: str) -> int:
        """Bytes of every file under a folder of the root."""
        return int(self.fs.du(self._path(name), total=True))

    def last_written(self, name: str) -> datetime:
        """When the newest file under a folder of the root was written (UTC); its creation time when empty."""
        files = self.fs.find(self._path(name))
        times = [self.fs.modified(path) for path in files] or [self.fs.modified(self._path(name))]
        return max(t if t.tzinfo else t.replace(tzinfo=timezone.utc) for t in times)

    def lineage(self, artifact: Artifact) -> dict[str, Any]:
        """The artifact and, recursively, the artifacts and datasets it was built from."""
        parents = []
        for item in artifact.manifest.get("inputs", []):
            if "artifact" in item:
                try:
                    parents.append(self.lineage(self.get(item["artifact"])) | {"role": item.get("role", "")})
                except StoreError:
                    parents.append({"id": item["artifact"], "missing": True, "role": item.get("role", "")})
            else:
                parents.append(dict(item))
        return {"id": artifact.id, "stage": artifact.stage, "inputs": parents}


def cache_folder() -> Path:
    """Where remote artifacts are downloaded: $RLHF_CACHE, else ~/.cache/rlhf-pipeline/artifacts."""
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "rlhf-pipeline" / "artifacts"))


def cached_manifest(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def download(artifact: Artifact, staging: Path) -> None:
    """Fetch every payload file of a remote artifact into `staging`, each checked against its sha256."""
    fs, base = open_fs(artifact.uri)
    for name, sha in artifact.manifest.get("files", {}).items():
        dst = staging / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            fs.get_file(f"{base}/{name}", str(dst))
        except FileNotFoundError:
            raise StoreError(
                f"{artifact.uri}/{name}: listed in the manifest but missing; the store is corrupt"
            ) from None
        if file_sha256(dst) != sha:
            raise StoreError(
                f"{artifact.uri}/{name}: checksum does not match the manifest; the store is corrupt"
            )
    staging.mkdir(parents=True, exist_ok=True)  # an artifact without payload files still gets its folder
    (staging / MANIFEST).write_text(manifest_text(artifact.manifest), encoding="utf-8")

"""The one model artifact format: what the trainer exports and the service loads.

    <root>/
      current -> <version>          relative symlink; the artifact the service loads from <root>
      <version>/                    <UTC YYYYMMDDTHHMMSSZ>-<first 8 hex of the content hash>
        manifest.json               `Manifest`; `files` holds the sha256 of every other file
        model.safetensors           named tensors (generator, user encoder, warm rows of V, biases)
        item_ids.json               warm item ids in row order of V

The content hash is sha256 over the sha256 of model.safetensors, of item_ids.json and of the
canonical JSON of the model config, so two exports of the same weights share a suffix and an
edit of any of the three (including the config in the manifest) is caught at load.

Writes are crash-safe: a version is built in `<root>/.tmp-*`, fsynced, then renamed into place,
and only then is `current` swapped (a temporary symlink os.replace'd over it, atomic on POSIX).
A reader therefore sees either the old or the new artifact, never a mix; anything starting with
"." is unfinished and never listed. A reader resolves `current` once and reads every file from
the resolved directory, so a swap during a load cannot mix two versions.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
import os
import platform
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import safetensors
import torch
from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationError, model_validator
from safetensors.torch import load_file, save_file

from service.durable import fsync_path, write_durably

FORMAT = "m2rec-artifact"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
TENSORS_FILE = "model.safetensors"
ITEM_IDS_FILE = "item_ids.json"
CURRENT_POINTER = "current"
TIMESTAMP_FORMAT = "%Y%m%dT%H%M%SZ"
VERSION_PATTERN = r"^\d{8}T\d{6}Z-[0-9a-f]{8}$"
_VERSION_RE = re.compile(VERSION_PATTERN)
_SHA256_PATTERN = r"^[0-9a-f]{64}$"
_TMP_PREFIX = ".tmp-"


class ArtifactError(Exception):
    """An artifact that cannot be used; the message names the artifact, the fault and the remedy."""


class LibraryVersions(BaseModel):
    """Versions the artifact was exported with: what to match when outputs differ across machines."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    torch: str
    numpy: str
    faiss: str
    safetensors: str
    python: str


class Manifest(BaseModel):
    """manifest.json of format_version 1. `model_args` is stored under the JSON key "model_config"
    (that name is taken by pydantic); it rebuilds the model: `ModelConfig(**manifest.model_args)`."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    format: Literal["m2rec-artifact"]
    format_version: Literal[1]
    version: str = Field(pattern=VERSION_PATTERN)
    created_at: datetime
    model_args: dict[str, JsonValue] = Field(alias="model_config")
    attribute_vocabulary: tuple[str, ...]
    content_dim: int = Field(ge=0)  # 0: the model takes attributes only
    embedding_dim: int = Field(ge=2)  # D + 1: item vector [v, b] with the bias folded in
    n_warm_items: int = Field(ge=0)
    metrics: dict[str, JsonValue]
    data_fingerprint: str = Field(min_length=1)
    dataset: str = Field(min_length=1)
    library_versions: LibraryVersions
    files: dict[str, str]

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        offset = self.created_at.utcoffset()
        if offset is None or offset.total_seconds() != 0:
            raise ValueError(f"created_at must be UTC with an explicit offset, got {self.created_at}")
        if self.version.split("-")[0] != self.created_at.strftime(TIMESTAMP_FORMAT):
            raise ValueError(f"version {self.version} does not start with the created_at timestamp "
                             f"{self.created_at.strftime(TIMESTAMP_FORMAT)}")
        for required in (TENSORS_FILE, ITEM_IDS_FILE):
            if required not in self.files:
                raise ValueError(f"files must list {required}")
        for name, digest in self.files.items():
            # names come from a file we did not necessarily write: no paths out of the directory
            if name in ("", ".", "..", MANIFEST_FILE) or "/" in name or "\\" in name:
                raise ValueError(f"files lists an invalid name {name!r}")
            if not re.fullmatch(_SHA256_PATTERN, digest):
                raise ValueError(f"files[{name!r}] is not a lowercase sha256 hex digest: {digest!r}")
        if len(set(self.attribute_vocabulary)) != len(self.attribute_vocabulary):
            raise ValueError("attribute_vocabulary has duplicate tokens")
        return self

    @property
    def content_hash(self) -> str:
        return self.version.split("-")[1]


@dataclass(frozen=True)
class Artifact:
    path: Path  # the resolved version directory, never the `current` pointer
    manifest: Manifest
    tensors: Mapping[str, torch.Tensor]
    item_ids: tuple[str, ...]  # row order of the warm rows of V

    @property
    def version(self) -> str:
        return self.manifest.version


# --------------------------------------------------------------------------- writing


def save_artifact(
    root: Path,
    *,
    tensors: Mapping[str, torch.Tensor],
    item_ids: list[str],
    model_config: Mapping[str, Any],
    attribute_vocabulary: list[str],
    content_dim: int,
    embedding_dim: int,
    metrics: Mapping[str, Any],
    data_fingerprint: str,
    dataset: str,
    activate: bool = True,
) -> Path:
    """Write a new version under `root` atomically and (with `activate`) point `current` at it.

    Returns the version directory. `activate=False` exports a candidate without serving it;
    `set_current` promotes it (or rolls back) later."""
    root = Path(root)
    if not tensors:
        raise ArtifactError("save_artifact: no tensors given; pass the model's state_dict")
    _check_item_ids(item_ids, f"save_artifact to {root}")
    config_json = _json_object(model_config, "model_config")
    metrics_json = _json_object(metrics, "metrics")
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=root))
    try:
        # clone: tied or sliced tensors share storage, which safetensors refuses to write
        cpu = {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}
        save_file(cpu, str(tmp / TENSORS_FILE))
        fsync_path(tmp / TENSORS_FILE)
        write_durably(tmp / ITEM_IDS_FILE, json.dumps(list(item_ids), indent=0) + "\n")
        files = {name: _sha256_file(tmp / name) for name in (TENSORS_FILE, ITEM_IDS_FILE)}
        created_at = datetime.now(UTC)
        version = f"{created_at.strftime(TIMESTAMP_FORMAT)}-{content_hash(files, config_json)[:8]}"
        try:
            manifest = Manifest(
                format=FORMAT,
                format_version=FORMAT_VERSION,
                version=version,
                created_at=created_at,
                model_args=config_json,
                attribute_vocabulary=tuple(attribute_vocabulary),
                content_dim=content_dim,
                embedding_dim=embedding_dim,
                n_warm_items=len(item_ids),
                metrics=metrics_json,
                data_fingerprint=data_fingerprint,
                dataset=dataset,
                library_versions=_library_versions(),
                files=files,
            )
        except ValidationError as e:
            raise ArtifactError(f"save_artifact to {root}: invalid manifest fields: {e}") from e
        write_durably(tmp / MANIFEST_FILE, _manifest_json(manifest))
        fsync_path(tmp)
        target = root / version
        try:
            # rename refuses a non-empty target, so an existing version is never overwritten
            os.rename(tmp, target)
        except OSError as e:
            raise ArtifactError(
                f"save_artifact: {target} already exists (the same weights, item ids and config were "
                f"exported within the same second); wait a second and export again") from e
        fsync_path(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if activate:
        set_current(root, version)
    return target


def set_current(root: Path, version: str) -> Path:
    """Atomically point `<root>/current` at an existing, loadable version (promote or roll back)."""
    root = Path(root)
    target = root / version
    if not _VERSION_RE.fullmatch(version) or not (target / MANIFEST_FILE).is_file():
        raise ArtifactError(f"set_current: {target} is not an artifact version; choose one of "
                            f"{list_versions(root)}")
    load_artifact(target)  # never point the service at something it cannot start from
    tmp_link = root / f"{_TMP_PREFIX}current-{os.getpid()}-{os.urandom(4).hex()}"
    os.symlink(version, tmp_link)  # relative: the root can be moved or mounted elsewhere
    try:
        os.replace(tmp_link, root / CURRENT_POINTER)
    except BaseException:
        tmp_link.unlink(missing_ok=True)
        raise
    fsync_path(root)
    return target


def content_hash(files: Mapping[str, str], model_config: Mapping[str, Any]) -> str:
    """sha256 hex over the tensor file, the item id file and the canonical model config."""
    canonical = json.dumps(model_config, sort_keys=True, separators=(",", ":"), allow_nan=False)
    config_digest = hashlib.sha256(canonical.encode()).hexdigest()
    text = (f"{TENSORS_FILE}:{files[TENSORS_FILE]}\n{ITEM_IDS_FILE}:{files[ITEM_IDS_FILE]}\n"
            f"model_config:{config_digest}\n")
    return hashlib.sha256(text.encode()).hexdigest()


# --------------------------------------------------------------------------- reading


def list_versions(root: Path) -> list[str]:
    """Complete versions under `root`, oldest first (by name: UTC second, then hash)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir()
                  if _VERSION_RE.fullmatch(p.name) and not p.is_symlink() and (p / MANIFEST_FILE).is_file())


def resolve_current(root: Path) -> Path:
    """The version directory `<root>/current` points at."""
    root = Path(root)
    pointer = root / CURRENT_POINTER
    if not pointer.is_symlink():
        raise ArtifactError(f"artifact root {root}: no '{CURRENT_POINTER}' pointer; export a model "
                            f"there or call set_current (versions present: {list_versions(root)})")
    target = os.readlink(pointer)
    resolved = (root / target).resolve()
    if not (resolved / MANIFEST_FILE).is_file():
        raise ArtifactError(f"artifact root {root}: '{CURRENT_POINTER}' points at {target}, which is not "
                            f"an artifact; call set_current with one of {list_versions(root)}")
    return resolved


def load_artifact(path: Path) -> Artifact:
    """Load and verify an artifact: a version directory, or a root holding a `current` pointer.

    Checks, in order: format and format_version, manifest fields, that every listed file exists
    and matches its sha256, the item ids, the version's content hash, the tensors."""
    path = Path(path)
    if (path / MANIFEST_FILE).is_file():
        directory = path.resolve()
    elif (path / CURRENT_POINTER).is_symlink():
        directory = resolve_current(path)
    else:
        raise ArtifactError(f"{path}: neither an artifact ({MANIFEST_FILE} missing) nor an artifact "
                            f"root ('{CURRENT_POINTER}' missing); point at an exported artifact")
    where = f"artifact at {directory}"
    manifest = _read_manifest(directory, where)
    for name, expected in manifest.files.items():
        file = directory / name
        if not file.is_file():
            raise ArtifactError(f"{where}: {name} is missing; the copy is incomplete, copy the whole "
                                f"directory again or re-export the model")
        got = _sha256_file(file)
        if got != expected:
            raise ArtifactError(f"{where}: checksum mismatch for {name} (expected {expected}, got {got}); "
                                f"the file changed after export, re-export the model")
    item_ids = _read_item_ids(directory / ITEM_IDS_FILE, where)
    if len(item_ids) != manifest.n_warm_items:
        raise ArtifactError(f"{where}: {ITEM_IDS_FILE} has {len(item_ids)} ids but the manifest says "
                            f"n_warm_items={manifest.n_warm_items}; re-export the model")
    expected_hash = content_hash(manifest.files, manifest.model_args)[:8]
    if manifest.content_hash != expected_hash:
        raise ArtifactError(f"{where}: version {manifest.version} does not match its content (hash "
                            f"{expected_hash}); the manifest's model_config or files were edited, "
                            f"re-export the model")
    try:
        tensors = load_file(str(directory / TENSORS_FILE), device="cpu")
    except Exception as e:  # safetensors raises its own error types for malformed files
        raise ArtifactError(f"{where}: {TENSORS_FILE} is not a readable safetensors file ({e}); "
                            f"re-export the model") from e
    return Artifact(path=directory, manifest=manifest, tensors=tensors, item_ids=tuple(item_ids))


# --------------------------------------------------------------------------- compatibility


def check_compatible(artifact: Artifact, expected: Mapping[str, tuple[int, ...]]) -> None:
    """Raise unless the artifact holds exactly the tensors, of exactly the shapes, a freshly built
    model expects (`{name: tuple(p.shape) for name, p in model.state_dict().items()}`)."""
    have = {name: tuple(t.shape) for name, t in artifact.tensors.items()}
    missing = sorted(set(expected) - set(have))
    unexpected = sorted(set(have) - set(expected))
    mismatched = [f"{name} (artifact {have[name]}, model {tuple(expected[name])})"
                  for name in sorted(set(have) & set(expected)) if have[name] != tuple(expected[name])]
    problems = []
    if missing:
        problems.append(f"missing tensors {missing}")
    if unexpected:
        problems.append(f"unexpected tensors {unexpected}")
    if mismatched:
        problems.append(f"shape mismatch for {', '.join(mismatched)}")
    if problems:
        raise ArtifactError(f"artifact at {artifact.path} does not fit the model built from its "
                            f"model_config: {'; '.join(problems)}; the model code and the artifact "
                            f"disagree, deploy matching code or re-export the model")


def check_content_dim(manifest: Manifest, dim: int, *, source: str = "content vector") -> None:
    """Raise unless a content vector of length `dim` fits the artifact (e.g. the image encoder's)."""
    if dim != manifest.content_dim:
        raise ArtifactError(f"{source} has dimension {dim} but artifact {manifest.version} was trained "
                            f"on content_dim={manifest.content_dim}; use the same content encoder as "
                            f"the training data or re-export the model")


# --------------------------------------------------------------------------- helpers


def _read_manifest(directory: Path, where: str) -> Manifest:
    try:
        raw = json.loads((directory / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{where}: {MANIFEST_FILE} is unreadable ({e}); re-export the model") from e
    if not isinstance(raw, dict):
        raise ArtifactError(f"{where}: {MANIFEST_FILE} is not a JSON object; re-export the model")
    # format first, with their own messages: a newer trainer's artifact must say so, not list fields
    if raw.get("format") != FORMAT:
        raise ArtifactError(f"{where}: unknown format {raw.get('format')!r} (expected {FORMAT!r}); "
                            f"this is not an m2rec model artifact")
    if raw.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{where}: unsupported format_version {raw.get('format_version')!r} (this "
                            f"service reads format_version {FORMAT_VERSION}); deploy a service that "
                            f"matches the trainer, or re-export with a matching trainer")
    try:
        return Manifest.model_validate(raw)
    except ValidationError as e:
        raise ArtifactError(f"{where}: invalid {MANIFEST_FILE}: {e}; re-export the model") from e


def _read_item_ids(file: Path, where: str) -> list[str]:
    try:
        ids = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{where}: {ITEM_IDS_FILE} is unreadable ({e}); re-export the model") from e
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise ArtifactError(f"{where}: {ITEM_IDS_FILE} must be a JSON list of strings; re-export the model")
    _check_item_ids(ids, where)
    return ids


def _check_item_ids(ids: list[str], where: str) -> None:
    if any(not isinstance(i, str) or not i for i in ids):
        raise ArtifactError(f"{where}: item ids must be non-empty strings")
    dupes = [i for i, n in Counter(ids).items() if n > 1]
    if dupes:
        raise ArtifactError(f"{where}: duplicate item ids {dupes[:5]}; each warm row of V is one item")


def _json_object(value: Mapping[str, Any], what: str) -> dict[str, JsonValue]:
    """Plain JSON data (tuples become lists), so that saving and loading hash the same config."""
    try:
        data = json.loads(json.dumps(dict(value), allow_nan=False))
    except (TypeError, ValueError) as e:
        bad = _non_finite_path(value, what)
        hint = (f"{bad} is not finite; store None instead" if bad
                else "use plain numbers, strings, lists and dicts")
        raise ArtifactError(f"save_artifact: {what} is not JSON data ({e}); {hint}") from e
    if not isinstance(data, dict):
        raise ArtifactError(f"save_artifact: {what} must be a dict, got {type(value).__name__}")
    return data


def _non_finite_path(value: Any, path: str) -> str | None:
    if isinstance(value, float) and not math.isfinite(value):
        return path
    items = (value.items() if isinstance(value, Mapping)
             else enumerate(value) if isinstance(value, list | tuple) else ())
    for key, sub in items:
        found = _non_finite_path(sub, f"{path}[{key!r}]")
        if found:
            return found
    return None


def _manifest_json(manifest: Manifest) -> str:
    return json.dumps(manifest.model_dump(mode="json", by_alias=True), indent=2, allow_nan=False) + "\n"


def _library_versions() -> LibraryVersions:
    return LibraryVersions(
        torch=torch.__version__,
        numpy=_distribution_version("numpy"),
        # read from package metadata: importing faiss here would load it into every trainer process
        faiss=_distribution_version("faiss-cpu", "faiss-gpu", "faiss"),
        safetensors=safetensors.__version__,
        python=platform.python_version(),
    )


def _distribution_version(*names: str) -> str:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "not installed"


def _sha256_file(file: Path) -> str:
    h = hashlib.sha256()
    with file.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()

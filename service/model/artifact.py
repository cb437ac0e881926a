"""The one model artifact format: what the trainer exports and the service loads.

    <root>/
      current -> <version>          relative symlink; the artifact the service loads from <root>
      <version>/                    <UTC YYYYMMDDTHHMMSSZ>-<first 8 hex of the content hash>
        manifest.json               `Manifest`; `files` holds the sha256 of every other file
        model.safetensors           named tensors (generator, user encoder, warm rows of V, biases, and
                                    the collaborative part's factors, ridge map and moments)
        item_ids.json               warm item ids in row order of V

The content hash is sha256 over the sha256 of model.safetensors, of item_ids.json and of the
canonical JSON of the model config, so two exports of the same weights share a suffix and an
edit of any of the three (including the config in the manifest) is caught at load.

Writes (service/model/artifact_export.py) are crash-safe: a version is built in `<root>/.tmp-*`,
fsynced, then renamed into place, and only then is `current` swapped (a temporary symlink
os.replace'd over it, atomic on POSIX). A reader therefore sees either the old or the new
artifact, never a mix; anything starting with "." is unfinished and never listed. A reader
resolves `current` once and reads every file from the resolved directory, so a swap during a
load cannot mix two versions.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationError, model_validator
from safetensors.torch import load_file

from service.model.mixing import Policy, policy_from_dict

FORMAT = "m2rec-artifact"
FORMAT_VERSION = 2  # 2: `mixing`, the validation-chosen policy for new items, in the manifest and the hash
MANIFEST_FILE = "manifest.json"
TENSORS_FILE = "model.safetensors"
ITEM_IDS_FILE = "item_ids.json"
CURRENT_POINTER = "current"
TIMESTAMP_FORMAT = "%Y%m%dT%H%M%SZ"
VERSION_PATTERN = r"^\d{8}T\d{6}Z-[0-9a-f]{8}$"
VERSION_RE = re.compile(VERSION_PATTERN)
_SHA256_PATTERN = r"^[0-9a-f]{64}$"
TMP_PREFIX = ".tmp-"


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
    """manifest.json of format_version 2. `model_args` is stored under the JSON key "model_config"
    (that name is taken by pydantic); it rebuilds the model: `ModelConfig(**manifest.model_args)`."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    format: Literal["m2rec-artifact"]
    format_version: Literal[2]
    version: str = Field(pattern=VERSION_PATTERN)
    created_at: datetime
    model_args: dict[str, JsonValue] = Field(alias="model_config")
    attribute_vocabulary: tuple[str, ...]
    content_dim: int = Field(ge=0)  # 0: the model takes attributes only
    embedding_dim: int = Field(ge=2)  # D + 1: item vector [v, b] with the bias folded in; + f: [v, b, y]
    n_warm_items: int = Field(ge=0)
    metrics: dict[str, JsonValue]
    # how new items mix with trained ones when a request does not say (service/model/mixing.py)
    mixing: dict[str, JsonValue]
    data_fingerprint: str = Field(min_length=1)
    dataset: str = Field(min_length=1)
    library_versions: LibraryVersions
    files: dict[str, str]
    # items of the training dataset that have interactions but no trained row (the split's evaluation
    # items); a deployment registering them serves them as new items. Older artifacts: ().
    held_out_items: tuple[str, ...] = ()

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
        try:
            policy_from_dict(self.mixing)  # a policy the service can apply
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"mixing {self.mixing!r} is not a policy the service can apply: {e}") from e
        return self

    @property
    def policy(self) -> Policy:
        return policy_from_dict(self.mixing)

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


def content_hash(files: Mapping[str, str], model_config: Mapping[str, Any], mixing: Mapping[str, Any]) -> str:
    """sha256 hex over the tensor file, the item id file, the canonical model config and mixing policy."""
    digests = [hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)
                              .encode()).hexdigest() for value in (model_config, mixing)]
    text = (f"{TENSORS_FILE}:{files[TENSORS_FILE]}\n{ITEM_IDS_FILE}:{files[ITEM_IDS_FILE]}\n"
            f"model_config:{digests[0]}\nmixing:{digests[1]}\n")
    return hashlib.sha256(text.encode()).hexdigest()


# --------------------------------------------------------------------------- reading


def list_versions(root: Path) -> list[str]:
    """Complete versions under `root`, oldest first (by name: UTC second, then hash)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir()
                  if VERSION_RE.fullmatch(p.name) and not p.is_symlink() and (p / MANIFEST_FILE).is_file())


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
        got = file_sha256(file)
        if got != expected:
            raise ArtifactError(f"{where}: checksum mismatch for {name} (expected {expected}, got {got}); "
                                f"the file changed after export, re-export the model")
    item_ids = _read_item_ids(directory / ITEM_IDS_FILE, where)
    if len(item_ids) != manifest.n_warm_items:
        raise ArtifactError(f"{where}: {ITEM_IDS_FILE} has {len(item_ids)} ids but the manifest says "
                            f"n_warm_items={manifest.n_warm_items}; re-export the model")
    expected_hash = content_hash(manifest.files, manifest.model_args, manifest.mixing)[:8]
    if manifest.content_hash != expected_hash:
        raise ArtifactError(f"{where}: version {manifest.version} does not match its content (hash "
                            f"{expected_hash}); the manifest's model_config, mixing or files were edited, "
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
    check_item_ids(ids, where)
    return ids


def check_item_ids(ids: list[str], where: str) -> None:
    if any(not isinstance(i, str) or not i for i in ids):
        raise ArtifactError(f"{where}: item ids must be non-empty strings")
    dupes = [i for i, n in Counter(ids).items() if n > 1]
    if dupes:
        raise ArtifactError(f"{where}: duplicate item ids {dupes[:5]}; each warm row of V is one item")


def file_sha256(file: Path) -> str:
    h = hashlib.sha256()
    with file.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()

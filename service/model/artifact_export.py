"""Writing the artifact format of service/model/artifact.py: a new version built aside and renamed into
place, and the `current` pointer swapped atomically. The trainer exports with `save_artifact`;
the service only reads (service/model/artifact.py)."""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import safetensors
import torch
from pydantic import JsonValue, ValidationError
from safetensors.torch import save_file

from service.durable import fsync_path, point_link, write_durably
from service.model.artifact import (
    CURRENT_POINTER,
    FORMAT,
    FORMAT_VERSION,
    ITEM_IDS_FILE,
    MANIFEST_FILE,
    TENSORS_FILE,
    TIMESTAMP_FORMAT,
    TMP_PREFIX,
    VERSION_RE,
    ArtifactError,
    LibraryVersions,
    Manifest,
    check_item_ids,
    content_hash,
    file_sha256,
    list_versions,
    load_artifact,
)


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
    mixing: Mapping[str, Any],
    data_fingerprint: str,
    dataset: str,
    activate: bool = True,
    held_out_items: Sequence[str] = (),
) -> Path:
    """Write a new version under `root` atomically and (with `activate`) point `current` at it.

    Returns the version directory. `activate=False` exports a candidate without serving it;
    `set_current` promotes it (or rolls back) later."""
    root = Path(root)
    if not tensors:
        raise ArtifactError("save_artifact: no tensors given; pass the model's state_dict")
    check_item_ids(item_ids, f"save_artifact to {root}")
    config_json = _json_object(model_config, "model_config")
    metrics_json = _json_object(metrics, "metrics")
    mixing_json = _json_object(mixing, "mixing")
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=root))
    try:
        # clone: tied or sliced tensors share storage, which safetensors refuses to write
        cpu = {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}
        save_file(cpu, str(tmp / TENSORS_FILE))
        fsync_path(tmp / TENSORS_FILE)
        write_durably(tmp / ITEM_IDS_FILE, json.dumps(list(item_ids), indent=0) + "\n")
        files = {name: file_sha256(tmp / name) for name in (TENSORS_FILE, ITEM_IDS_FILE)}
        created_at = datetime.now(UTC)
        version = f"{created_at.strftime(TIMESTAMP_FORMAT)}-{content_hash(files, config_json, mixing_json)[:8]}"
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
                mixing=mixing_json,
                data_fingerprint=data_fingerprint,
                dataset=dataset,
                library_versions=_library_versions(),
                files=files,
                held_out_items=tuple(held_out_items),
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
    if not VERSION_RE.fullmatch(version) or not (target / MANIFEST_FILE).is_file():
        raise ArtifactError(f"set_current: {target} is not an artifact version; choose one of "
                            f"{list_versions(root)}")
    load_artifact(target)  # never point the service at something it cannot start from
    point_link(root / CURRENT_POINTER, version)
    return target


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

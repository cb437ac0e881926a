"""The artifact format: real torch tensors through real safetensors files on a real file system."""

from __future__ import annotations

import hashlib
import json
import re
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import torch

from service.model.artifact import (
    CURRENT_POINTER,
    ITEM_IDS_FILE,
    MANIFEST_FILE,
    TENSORS_FILE,
    Artifact,
    ArtifactError,
    check_compatible,
    check_content_dim,
    list_versions,
    load_artifact,
    resolve_current,
)
from service.model.artifact_export import save_artifact, set_current

MODEL_CONFIG: dict[str, Any] = {"latent_dim": 4, "hidden": (8, 6), "dropout": 0.5, "name": "tiny"}
METRICS: dict[str, Any] = {"validation": {"cold_only": {"ndcg@20": 0.25, "recall@20": 0.3}},
                           "test": {"note": "x"}}


def make_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "generator.attr_embedding.weight": torch.randn(7, 4, generator=g),  # (A, D)
        "generator.image_proj.weight": torch.randn(4, 3, generator=g),  # (D, F)
        "encoder.hidden.weight": torch.randn(6, 4, generator=g).to(torch.float64),
        "V": torch.randn(5, 4, generator=g),  # (I, D)
        "b": torch.randn(5, generator=g).to(torch.bfloat16),  # (I,)
        "step": torch.tensor([3], dtype=torch.int64),
    }


MIXING: dict[str, Any] = {"policy": "calibrated", "scale": 0.7, "offset": 2.1}


def save(root: Path, seed: int = 0, **overrides: Any) -> Path:
    kwargs: dict[str, Any] = {
        "tensors": make_tensors(seed),
        "item_ids": ["i1", "i2", "i3", "i4", "i5"],
        "model_config": MODEL_CONFIG,
        "attribute_vocabulary": ["genre:Drama", "genre:Comedy", "year:1995"],
        "content_dim": 3,
        "embedding_dim": 5,
        "metrics": METRICS,
        "mixing": MIXING,
        "data_fingerprint": "ab" * 32,
        "dataset": "ml-100k",
    }
    kwargs.update(overrides)
    return save_artifact(root, **kwargs)


def rewrite_manifest(artifact_dir: Path, **changes: Any) -> None:
    manifest = json.loads((artifact_dir / MANIFEST_FILE).read_text())
    manifest.update(changes)
    (artifact_dir / MANIFEST_FILE).write_text(json.dumps(manifest))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_round_trip_keeps_tensors_bit_identical_and_manifest_fields(tmp_path: Path) -> None:
    before = datetime.now(UTC) - timedelta(seconds=1)
    artifact_dir = save(tmp_path)
    artifact = load_artifact(artifact_dir)

    original = make_tensors(0)
    assert set(artifact.tensors) == set(original)
    for name, tensor in original.items():
        loaded = artifact.tensors[name]
        assert loaded.dtype == tensor.dtype, name
        assert loaded.shape == tensor.shape, name
        assert loaded.view(torch.uint8).tolist() == tensor.view(torch.uint8).tolist(), name
    m = artifact.manifest
    assert artifact.path == artifact_dir.resolve()
    assert artifact.item_ids == ("i1", "i2", "i3", "i4", "i5")
    assert m.format == "m2rec-artifact"
    assert m.format_version == 2
    assert m.mixing == MIXING and m.policy.to_dict() == MIXING
    assert m.version == artifact_dir.name
    assert m.model_args == {"latent_dim": 4, "hidden": [8, 6], "dropout": 0.5, "name": "tiny"}
    assert m.attribute_vocabulary == ("genre:Drama", "genre:Comedy", "year:1995")
    assert (m.content_dim, m.embedding_dim, m.n_warm_items) == (3, 5, 5)
    assert m.metrics == METRICS
    assert (m.data_fingerprint, m.dataset) == ("ab" * 32, "ml-100k")
    assert m.library_versions.torch == torch.__version__
    assert before <= m.created_at <= datetime.now(UTC)
    assert m.files == {TENSORS_FILE: sha256(artifact_dir / TENSORS_FILE),
                       ITEM_IDS_FILE: sha256(artifact_dir / ITEM_IDS_FILE)}
    raw = json.loads((artifact_dir / MANIFEST_FILE).read_text())
    assert raw["model_config"] == m.model_args  # stored under the name the format specifies


def test_version_is_utc_timestamp_plus_hash_of_weights_ids_and_config(tmp_path: Path) -> None:
    artifact_dir = save(tmp_path / "a")
    timestamp, suffix = artifact_dir.name.split("-")
    created = datetime.strptime(timestamp, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    assert abs(datetime.now(UTC) - created) < timedelta(minutes=1)

    config_sha = hashlib.sha256(json.dumps(
        {"dropout": 0.5, "hidden": [8, 6], "latent_dim": 4, "name": "tiny"}, separators=(",", ":")
    ).encode()).hexdigest()
    mixing_sha = hashlib.sha256(json.dumps(
        {"offset": 2.1, "policy": "calibrated", "scale": 0.7}, separators=(",", ":")).encode()).hexdigest()
    text = (f"model.safetensors:{sha256(artifact_dir / TENSORS_FILE)}\n"
            f"item_ids.json:{sha256(artifact_dir / ITEM_IDS_FILE)}\nmodel_config:{config_sha}\n"
            f"mixing:{mixing_sha}\n")
    assert suffix == hashlib.sha256(text.encode()).hexdigest()[:8]

    assert save(tmp_path / "b").name.split("-")[1] == suffix  # same content, same hash
    assert save(tmp_path / "c", seed=1).name.split("-")[1] != suffix
    assert save(tmp_path / "d", model_config={**MODEL_CONFIG, "dropout": 0.4}).name.split("-")[1] != suffix
    assert save(tmp_path / "e", mixing={"policy": "quota", "cold_share": 0.3}).name.split("-")[1] != suffix


def test_an_edited_mixing_policy_fails_the_content_hash(tmp_path: Path) -> None:
    artifact_dir = save(tmp_path)
    rewrite_manifest(artifact_dir, mixing={"policy": "quota", "cold_share": 1.0})
    with pytest.raises(ArtifactError, match=r"does not match its content .*mixing"):
        load_artifact(artifact_dir)


@pytest.mark.parametrize("mixing", [{"policy": "fifty-fifty"}, {"policy": "quota", "cold_share": 1.5},
                                    {"policy": "calibrated", "scale": -1.0, "offset": 0.0}])
def test_a_policy_the_service_cannot_apply_is_refused_at_export(tmp_path: Path, mixing: dict[str, Any]) -> None:
    with pytest.raises(ArtifactError, match="mixing"):
        save(tmp_path, mixing=mixing)


def test_tampered_tensor_file_fails_naming_the_checksum(tmp_path: Path) -> None:
    artifact_dir = save(tmp_path)
    data = bytearray((artifact_dir / TENSORS_FILE).read_bytes())
    data[-1] ^= 0x01  # one bit of one weight: still a valid safetensors file
    (artifact_dir / TENSORS_FILE).write_bytes(bytes(data))
    expected = r"checksum mismatch for model\.safetensors \(expected [0-9a-f]{64}, got [0-9a-f]{64}\)"
    with pytest.raises(ArtifactError, match=expected):
        load_artifact(artifact_dir)


def test_unknown_format_version_is_rejected_with_a_clear_message(tmp_path: Path) -> None:
    artifact_dir = save(tmp_path)
    rewrite_manifest(artifact_dir, format_version=1)  # before the mixing policy was stored
    with pytest.raises(ArtifactError, match=r"unsupported format_version 1 .*reads format_version 2"):
        load_artifact(artifact_dir)


def test_unknown_format_is_rejected_with_a_clear_message(tmp_path: Path) -> None:
    artifact_dir = save(tmp_path)
    rewrite_manifest(artifact_dir, format="pytorch-checkpoint")
    with pytest.raises(ArtifactError, match=r"unknown format 'pytorch-checkpoint'"):
        load_artifact(artifact_dir)


def test_missing_listed_file_is_reported_by_name(tmp_path: Path) -> None:
    artifact_dir = save(tmp_path)
    (artifact_dir / ITEM_IDS_FILE).unlink()
    with pytest.raises(ArtifactError, match=r"item_ids\.json is missing"):
        load_artifact(artifact_dir)


def test_item_ids_shorter_than_n_warm_items_is_rejected(tmp_path: Path) -> None:
    artifact_dir = save(tmp_path)
    (artifact_dir / ITEM_IDS_FILE).write_text(json.dumps(["i1", "i2", "i3", "i4"]))
    manifest = json.loads((artifact_dir / MANIFEST_FILE).read_text())
    manifest["files"][ITEM_IDS_FILE] = sha256(artifact_dir / ITEM_IDS_FILE)  # checksum no longer the catch
    (artifact_dir / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"has 4 ids but the manifest says n_warm_items=5"):
        load_artifact(artifact_dir)


def test_edited_model_config_no_longer_matches_the_version_hash(tmp_path: Path) -> None:
    artifact_dir = save(tmp_path)
    rewrite_manifest(artifact_dir, model_config={**MODEL_CONFIG, "hidden": [8, 6], "latent_dim": 5})
    with pytest.raises(ArtifactError, match=r"does not match its content"):
        load_artifact(artifact_dir)


def test_unreadable_manifest_is_an_artifact_error(tmp_path: Path) -> None:
    artifact_dir = save(tmp_path)
    (artifact_dir / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(ArtifactError, match=r"manifest\.json is unreadable"):
        load_artifact(artifact_dir)


def test_manifest_listing_a_path_outside_the_directory_is_rejected(tmp_path: Path) -> None:
    artifact_dir = save(tmp_path)
    manifest = json.loads((artifact_dir / MANIFEST_FILE).read_text())
    manifest["files"]["../secret"] = "0" * 64
    (artifact_dir / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"invalid name '\.\./secret'"):
        load_artifact(artifact_dir)


def test_current_points_at_the_newest_after_two_saves(tmp_path: Path) -> None:
    first = save(tmp_path, seed=0)
    second = save(tmp_path, seed=1)
    assert resolve_current(tmp_path) == second.resolve()
    assert (tmp_path / CURRENT_POINTER).is_symlink()
    loaded = load_artifact(tmp_path)
    assert loaded.version == second.name
    assert torch.equal(loaded.tensors["V"], make_tensors(1)["V"])
    assert set(list_versions(tmp_path)) == {first.name, second.name}


def test_saving_without_activate_keeps_current_and_set_current_rolls_back(tmp_path: Path) -> None:
    first = save(tmp_path, seed=0)
    candidate = save(tmp_path, seed=1, activate=False)
    assert load_artifact(tmp_path).version == first.name
    set_current(tmp_path, candidate.name)
    assert load_artifact(tmp_path).version == candidate.name
    set_current(tmp_path, first.name)
    assert load_artifact(tmp_path).version == first.name


def test_set_current_refuses_a_broken_version(tmp_path: Path) -> None:
    good = save(tmp_path, seed=0)
    broken = save(tmp_path, seed=1, activate=False)
    (broken / TENSORS_FILE).write_bytes(b"garbage")
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        set_current(tmp_path, broken.name)
    assert resolve_current(tmp_path) == good.resolve()


def test_root_without_current_pointer_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="neither an artifact"):
        load_artifact(tmp_path)
    save(tmp_path, activate=False)
    with pytest.raises(ArtifactError, match="no 'current' pointer"):
        resolve_current(tmp_path)


def test_unfinished_temporary_directory_is_never_listed_or_loaded(tmp_path: Path) -> None:
    done = save(tmp_path)
    # what a crash between writing the weights and the rename leaves behind
    crashed = tmp_path / ".tmp-crashed"
    crashed.mkdir()
    (crashed / TENSORS_FILE).write_bytes(b"half")
    (crashed / MANIFEST_FILE).write_text("{}")
    assert list_versions(tmp_path) == [done.name]
    assert load_artifact(tmp_path).version == done.name


def test_concurrent_reader_only_ever_sees_complete_artifacts(tmp_path: Path) -> None:
    def save_numbered(n: int) -> str:
        return save(tmp_path, seed=n, tensors={**make_tensors(n), "step": torch.tensor([n])}).name

    saved = {0: save_numbered(0)}
    seen: list[tuple[str, int]] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def read_until_stopped() -> None:
        while not stop.is_set():
            try:
                artifact = load_artifact(tmp_path)
                # the step tensor tells which save a version came from: never a mix of two
                seen.append((artifact.version, int(artifact.tensors["step"].item())))
                assert all(re.fullmatch(r"\d{8}T\d{6}Z-[0-9a-f]{8}", v) for v in list_versions(tmp_path))
            except BaseException as e:
                errors.append(e)
                return

    reader = threading.Thread(target=read_until_stopped)
    reader.start()
    try:
        for n in range(1, 8):
            saved[n] = save_numbered(n)
    finally:
        stop.set()
        reader.join(timeout=30)
    assert not errors, errors
    assert seen
    number_of = {version: n for n, version in saved.items()}
    assert all(number_of[version] == step for version, step in seen)
    assert resolve_current(tmp_path).name == saved[7]


def artifact_for_compatibility(tmp_path: Path) -> Artifact:
    return load_artifact(save(tmp_path))


def test_compatibility_check_passes_for_matching_shapes(tmp_path: Path) -> None:
    artifact = artifact_for_compatibility(tmp_path)
    check_compatible(artifact, {name: tuple(t.shape) for name, t in make_tensors().items()})


def test_compatibility_check_names_the_mismatched_tensor(tmp_path: Path) -> None:
    artifact = artifact_for_compatibility(tmp_path)
    expected = {name: tuple(t.shape) for name, t in make_tensors().items()}
    expected["V"] = (5, 8)
    with pytest.raises(ArtifactError, match=r"shape mismatch for V \(artifact \(5, 4\), model \(5, 8\)\)"):
        check_compatible(artifact, expected)


def test_compatibility_check_names_missing_and_unexpected_tensors(tmp_path: Path) -> None:
    artifact = artifact_for_compatibility(tmp_path)
    expected = {name: tuple(t.shape) for name, t in make_tensors().items() if name != "step"}
    expected["encoder.mu.weight"] = (4, 6)
    with pytest.raises(ArtifactError, match=r"missing tensors \['encoder\.mu\.weight'\]; "
                                            r"unexpected tensors \['step'\]"):
        check_compatible(artifact, expected)


def test_content_dimension_check_against_the_manifest(tmp_path: Path) -> None:
    manifest = artifact_for_compatibility(tmp_path).manifest
    check_content_dim(manifest, 3)
    with pytest.raises(ArtifactError, match=r"dimension 512 but .* content_dim=3"):
        check_content_dim(manifest, 512)


def test_save_rejects_non_finite_metrics_naming_the_entry(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match=r"metrics\['test'\]\['ndcg@10'\] is not finite"):
        save(tmp_path, metrics={"test": {"ndcg@10": float("nan")}})
    assert list(tmp_path.iterdir()) == []


def test_save_rejects_duplicate_item_ids_and_leaves_nothing_behind(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match=r"duplicate item ids \['i1'\]"):
        save(tmp_path, item_ids=["i1", "i1", "i3", "i4", "i5"])
    assert list_versions(tmp_path) == []
    assert not any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())


def test_tied_tensors_sharing_storage_are_saved(tmp_path: Path) -> None:
    V = torch.randn(5, 4)  # (I, D)
    tensors = {"encoder.V": V, "decoder.V": V, "V_head": V[:2]}
    artifact = load_artifact(save(tmp_path, tensors=tensors))
    assert torch.equal(artifact.tensors["decoder.V"], V)
    assert torch.equal(artifact.tensors["V_head"], V[:2])

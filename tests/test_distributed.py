"""Training on several processes (training/distributed.py): a real `torchrun --nproc_per_node 2` run of
the trainer on ml-100k whose artifact serves, and the collective helpers checked against one
process on two real gloo ranks."""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.config import Settings
from service.model import M2Rec
from service.model.artifact import load_artifact
from service.model.generator import M2VAEGenerator
from tests.shared_data import ml100k
from tests.test_train import TINY, tiny_dataset
from training import distributed
from training.dataset import save_dataset
from training.item_rows import generated_rows, user_vectors
from training.linear_fit import LinearFit
from training.split import cold_start_split
from training.train_config import TrainConfig
from training.train_data import TrainingData, prepare

ROOT = Path(__file__).resolve().parents[1]
# the tiny real model of the service fixtures (tests/conftest.py), as trainer flags
TINY_FLAGS = ["--epochs", "2", "--eval-every", "1", "--refit-epochs", "1", "--item-dim", "16", "--user-latent", "8",
              "--gen-hidden", "16", "--gen-latent", "8", "--b-min-steps", "1", "--new-bias-weights", "1",
              "--progress", "false"]


@pytest.mark.slow
def test_torchrun_with_two_processes_exports_one_artifact_that_serves(tmp_path: Path) -> None:
    dataset = ml100k()
    data_dir = save_dataset(dataset, tmp_path / "ml-100k")
    out = tmp_path / "artifacts"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "training.train", "--dataset", str(data_dir), "--out", str(out), *TINY_FLAGS],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    # both runs (validation, refit) ended with the same bytes on both ranks (checked by the trainer)
    assert done.stderr.count("model replicas agree across 2 ranks") == 2, done.stderr[-4000:]
    versions = [p for p in out.iterdir() if p.is_dir() and not p.is_symlink()]
    assert len(versions) == 1, versions  # rank 0 alone exports
    assert done.stdout.strip().splitlines() == [str(versions[0])]  # and alone prints

    artifact = load_artifact(out)
    manifest = json.loads((versions[0] / "manifest.json").read_text())
    assert manifest["metrics"]["processes"] == 2
    assert manifest["metrics"]["validation"]["hybrid"]["recall@20"] > 0
    assert artifact.item_ids and manifest["mixing"] == manifest["metrics"]["validation"]["policy"]

    held_out = manifest["held_out_items"]
    j = dataset.item_ids.index(held_out[0]) if held_out else 0
    assert dataset.features is not None
    settings = Settings(artifact_path=out, store_url=str(tmp_path / "m2rec.sqlite3"))
    with TestClient(create_app(settings)) as client:
        posted = client.post("/items", json={"id": "movie:new", "attributes": dataset.item_attributes[j],
                                             "content": dataset.features[j].tolist()})
        assert posted.status_code == 201, posted.text
        liked = client.post("/interactions", json={"interactions": [
            {"user": "alice", "item": item} for item in artifact.item_ids[:3]]})
        assert liked.status_code in (200, 201, 202), liked.text
        answer = client.get("/recommend", params={"user": "alice", "k": 10})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert len(body["items"]) == 10 and body["model_version"] == manifest["version"]
        assert not {i["id"] for i in body["items"]} & set(artifact.item_ids[:3])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _helpers_on_a_rank(rank: int, world: int, port: int, out: str) -> None:
    """One gloo rank: run every collective helper the trainer uses and save what it saw."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    distributed.init_from_env()
    try:
        torch.save(_helper_results(), Path(out) / f"rank{rank}.pt")
    finally:
        distributed.shutdown()


def _tiny_model() -> tuple[TrainingData, M2Rec, LinearFit, torch.Tensor]:
    """Tiny data, a model of it with a perturbed item table (so no fit is trivial), its ridge fit
    and the targets [V; b] (J, D+1); built alike on every rank (same seed)."""
    dataset = tiny_dataset()
    data = prepare(dataset, cold_start_split(dataset, seed=0))
    cfg = TrainConfig(seed=0, **TINY)  # type: ignore[arg-type]
    torch.manual_seed(0)
    model = M2Rec(cfg.model_config(data.warm.size, len(data.vocabulary), data.content_dim))
    with torch.no_grad():
        model.user.b.normal_()
    assert isinstance(model.generator, M2VAEGenerator) and model.generator.linear is not None
    linear = LinearFit(data, model.generator.linear, ridge=2.0, held_out=True)
    return data, model, linear, model.item_rows().detach()


def _helper_results() -> dict[str, Any]:
    data, model, linear, targets = _tiny_model()
    if distributed.rank() != 0:  # rank 0's solution must arrive, not be recomputed from the same inputs
        with torch.no_grad():
            targets = targets + 1.0
    linear.refit_shared(targets)
    path = linear.path
    order = distributed.ShardedOrder(data.train_users, seed=5)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        if distributed.rank() == 1:
            state["user.b"] += 1.0
        distributed.check_same_state(state)
        diverged = False
    except RuntimeError:
        diverged = True
    return {
        "ridge": {k: v.clone() for k, v in path.state_dict().items()},
        "fitted": {k: torch.from_numpy(v.copy()) for k, v in linear.fitted.items()},
        "shift": linear.held_out_shift(path.patterns(data.inputs(data.warm))),
        "users": distributed.gather_rows(lambda u: user_vectors(model, data, u), data.history.shape[0]),
        "rows": distributed.gather_rows(lambda r: generated_rows(model, data, data.warm[r]), data.warm.size),
        "order": [order(0), order(1)],
        "mean": distributed.mean_over_ranks({"loss": float(distributed.rank())}),
        "decision": distributed.broadcast_object(f"rank {distributed.rank()}"),
        "diverged_detected": diverged,
        "same_state_digest": distributed.check_same_state(model.state_dict()),
    }


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("ranks")
    port = _free_port()
    spawn = multiprocessing.get_context("spawn")  # a fresh interpreter per rank, as torchrun gives
    ranks = [spawn.Process(target=_helpers_on_a_rank, args=(r, 2, port, str(out))) for r in range(2)]
    for p in ranks:
        p.start()
    for p in ranks:
        p.join(timeout=300)
        if p.is_alive():  # a rank stuck in a collective: do not leave it behind
            p.kill()
    assert [p.exitcode for p in ranks] == [0, 0]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def test_the_ridge_refit_is_solved_on_rank_0_and_identical_on_every_rank(two_ranks: list[dict[str, Any]]) -> None:
    """Rank 1 is handed other targets on purpose: it must still end with rank 0's solution, which is
    the one-process fit of rank 0's targets bit for bit."""
    data, _, linear, targets = _tiny_model()
    linear.refit(targets)
    alone = {k: v.clone() for k, v in linear.path.state_dict().items()}
    assert any(v.abs().sum() > 0 for v in alone.values())
    for rank in two_ranks:
        assert rank["ridge"].keys() == alone.keys()
        assert all(torch.equal(rank["ridge"][k], alone[k]) for k in alone)
        assert rank["fitted"].keys() == linear.fitted.keys()
        assert all(torch.equal(rank["fitted"][k], torch.from_numpy(linear.fitted[k])) for k in linear.fitted)
        assert torch.equal(rank["shift"], linear.held_out_shift(linear.path.patterns(data.inputs(data.warm))))


def test_full_table_passes_split_over_ranks_give_the_one_process_tables(two_ranks: list[dict[str, Any]]) -> None:
    data, model, linear, targets = _tiny_model()
    linear.refit(targets)  # as the ranks did before their passes: generated rows read the ridge path
    users, rows = user_vectors(model, data), generated_rows(model, data, data.warm)
    for rank in two_ranks:
        assert rank["users"].shape == users.shape and rank["rows"].shape == rows.shape
        torch.testing.assert_close(rank["users"], users, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(rank["rows"], rows, rtol=1e-5, atol=1e-6)
    assert torch.equal(two_ranks[0]["users"], two_ranks[1]["users"])  # one table, whichever rank reads it


def test_the_sampler_deals_every_user_to_one_rank_in_a_new_order_each_pass(two_ranks: list[dict[str, Any]]) -> None:
    data, _, _, _ = _tiny_model()
    pool = data.train_users
    for p in range(2):
        shares = [rank["order"][p] for rank in two_ranks]
        assert shares[0].size == shares[1].size == -(-pool.size // 2)  # equal steps on every rank
        dealt = np.concatenate(shares)
        assert set(dealt.tolist()) == set(pool.tolist())
        assert dealt.size - np.unique(dealt).size == dealt.size - pool.size  # only the padding repeats
    assert not np.array_equal(two_ranks[0]["order"][0], two_ranks[0]["order"][1])


def test_rank_0_decides_figures_are_averaged_and_diverged_replicas_are_caught(
        two_ranks: list[dict[str, Any]]) -> None:
    assert [rank["decision"] for rank in two_ranks] == ["rank 0", "rank 0"]
    assert [rank["mean"] for rank in two_ranks] == [{"loss": 0.5}, {"loss": 0.5}]
    assert [rank["diverged_detected"] for rank in two_ranks] == [True, True]
    assert two_ranks[0]["same_state_digest"] == two_ranks[1]["same_state_digest"]


def test_a_plain_process_is_a_world_of_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without torchrun nothing is initialised and every helper is the identity: the single-process
    trainer runs exactly the code it ran before distributed training existed."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    distributed.init_from_env()
    assert not distributed.launched() and not distributed.active()
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    assert distributed.shard(7) == (0, 7)
    assert distributed.mean_over_ranks({"a": 1.5}) == {"a": 1.5}
    table = torch.arange(12.0).reshape(6, 2)
    assert torch.equal(distributed.gather_rows(lambda r: table[torch.from_numpy(r)], 6), table)
    monkeypatch.setenv("M2REC_TRAIN_THREADS", "3")
    assert distributed.threads_per_process() == 3
    monkeypatch.delenv("M2REC_TRAIN_THREADS")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert distributed.threads_per_process() == 1
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert distributed.threads_per_process() == distributed.DEFAULT_THREADS

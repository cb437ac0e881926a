"""The README's demo, replayed as written (issue 17, 9): the first list it shows belongs to a user who
has not seen the new item, so it can show it; the user who has seen it is never offered it. (The
README's own run, on its ml-100k model, puts the new movie first in bob's list.)"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.config import Settings
from tests.conftest import TrainedArtifact
from tests.live_server import REPO


def _demo() -> tuple[list[tuple[str, dict[str, Any]]], list[str]]:
    """(the posted bodies by path, the users whose lists it asks for, in order) from the README's block."""
    text = (REPO / "README.md").read_text()
    block = text.split("## Using the service", 1)[1].split("```", 2)[1]
    posts = [(path, json.loads(body)) for path, body in
             re.findall(r"-X POST localhost:8000(/\S+) .*?-d '(\{.*?\})'", block, flags=re.S)]
    users = re.findall(r"localhost:8000/recommend\?user=([\w:.-]+)", block)
    return posts, users


@pytest.fixture
def client(trained_artifact: TrainedArtifact, tmp_path: Any) -> Iterator[TestClient]:
    settings = Settings(artifact_path=trained_artifact.root, store_url=str(tmp_path / "m2rec.sqlite3"), k_max=5000)
    with TestClient(create_app(settings)) as c:
        yield c


def test_the_readme_demo_shows_the_new_item_to_a_user_who_has_not_seen_it(client: TestClient) -> None:
    posts, users = _demo()
    items = [body for path, body in posts if path == "/items"]
    events = [e for path, body in posts if path == "/interactions" for e in body["interactions"]]
    (new,) = items
    for path, body in posts:
        assert client.post(path, json=body).status_code in (200, 201), (path, body)
    seen = {e["user"] for e in events if e["item"] == new["id"]}
    first = users[0]
    assert first not in seen, f"the README's first list is {first}'s, who already has {new['id']}"
    assert {e["item"] for e in events if e["user"] == first} == {e["item"] for e in events if e["user"] in seen} - {
        new["id"]}, "the demo's two users share their other items"
    ranked = [i["id"] for i in client.get("/recommend", params={"user": first, "k": 5000}).json()["items"]]
    assert new["id"] in ranked
    for user in seen & set(users):
        listed = [i["id"] for i in client.get("/recommend", params={"user": user, "k": 5000}).json()["items"]]
        assert new["id"] not in listed

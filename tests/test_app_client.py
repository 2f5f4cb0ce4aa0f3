"""The served app through `gradio_client`, logged in: a ranking submitted, a wrong password and a peek refused."""

from __future__ import annotations

import json
import sqlite3

import pytest
from app_helpers import PASSWORDS, label_db, served

from pipeline.app import tasks
from pipeline.app.tasks import Completion, NewTask

PROMPT = [{"role": "user", "content": "Pick a number."}]


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    from pipeline.app.session import AppSettings
    from pipeline.store import ArtifactStore

    folder = tmp_path_factory.mktemp("client_app")
    db = label_db(folder)
    tasks.add_tasks(db, [NewTask("rank", PROMPT, "t1", [Completion(str(i)) for i in range(3)])], overlap=2)
    with served(AppSettings(db=db, store=ArtifactStore(folder / "store"))) as url:
        yield url, db


def client(url: str, user: str):
    from gradio_client import Client

    return Client(url, auth=(user, PASSWORDS[user]), verbose=False, download_files=False)


def test_a_wrong_password_is_refused(app_url):
    import httpx

    url, _ = app_url
    refused = httpx.post(f"{url}/login", data={"username": "alice", "password": "bob-secret-22"})
    assert refused.status_code == 400
    accepted = httpx.post(f"{url}/login", data={"username": "alice", "password": PASSWORDS["alice"]})
    assert accepted.status_code == 200 and accepted.json() == {"success": True}
    with pytest.raises(ValueError, match="[Cc]ould not login"):
        from gradio_client import Client

        Client(url, auth=("alice", "not-her-password"), verbose=False)


def test_a_ranking_submitted_through_the_client_is_stored_once(app_url):
    url, db = app_url
    alice = client(url, "alice")
    status, task_html, answer, note, key = alice.predict(api_name="/next_ranking")
    assert status.startswith("Task 1 · 3 responses") and task_html.count('class="rank-slot"') == 3
    assert json.loads(answer) == {"tiers": [None] * 3, "flags": [[], [], []]} and key
    ranking = json.dumps({"tiers": [2, 1, 2], "flags": [["harmful"], [], []]})
    after = alice.predict(key, ranking, "a note", api_name="/submit_ranking")
    assert after[0].startswith("Saved (label") and after[-1] == key  # the key to undo
    again = alice.predict(key, ranking, "a note", api_name="/submit_ranking")
    assert again[0].startswith("Already saved")
    row = sqlite3.connect(db.path).execute("SELECT user, body, shown_order FROM labels").fetchall()
    assert len(row) == 1 and row[0][0] == "alice"
    order = json.loads(row[0][2])
    body = json.loads(row[0][1])
    assert [body["tiers"][position] for position in order] == [2, 1, 2]
    assert body["flags"][order[0]] == ["harmful"] and body["note"] == "a note"


def test_an_annotator_cannot_see_anothers_labels_but_an_admin_can(app_url):
    from gradio_client.exceptions import AppError

    url, _ = app_url
    carol = client(url, "carol")
    with pytest.raises(AppError, match="only admins"):
        carol.predict("alice", api_name="/labels_of")
    with pytest.raises(AppError, match="only admins"):
        carol.predict(api_name="/export_labels")
    carol.predict("carol", api_name="/labels_of")  # one's own: allowed
    seen = client(url, "bob").predict("alice", api_name="/labels_of")
    assert [row[1] for row in seen["data"]] == ["ranking"]

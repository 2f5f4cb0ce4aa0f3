"""The Arena tab in a real browser (headless Debian Chromium through Playwright), with two tiny models.

Alice asks both models one prompt in anonymous mode: both replies appear, and until she votes the page holds
neither model's name (the whole DOM is searched, hidden elements included). She votes; the names appear, the
vote buttons lock, and the database holds her vote with both models' artifact ids. The leaderboard sub-tab
then lists both models. Screenshots of each step are kept under the test's output folder.
"""

from __future__ import annotations

import json
import re
import sqlite3

import pytest
from app_helpers import label_db, served
from browser_helpers import chromium, playwright_or_skip, signed_in
from conftest import build_tiny_llama

PROMPT = "Write a haiku about <b>autumn</b>."

playwright_api = playwright_or_skip()


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_model_dir, tiny_tokenizer):
    from pipeline.app.catalog import list_models
    from pipeline.app.session import AppSettings
    from pipeline.store import ArtifactStore

    folder = tmp_path_factory.mktemp("browser_arena")
    store = ArtifactStore(folder / "store")
    sft = store.publish("sft", tiny_model_dir, config={})
    ppo = store.publish("ppo", build_tiny_llama(tiny_tokenizer, folder / "other", seed=5), config={})
    settings = AppSettings(db=label_db(folder), store=store, engine="hf")
    labels = {entry.ref: entry.label for entry in list_models(store)}
    with served(settings) as url:
        yield url, settings.db, {sft.id: labels[sft.id], ppo.id: labels[ppo.id]}


@pytest.fixture(scope="module")
def browser():
    with chromium(playwright_api) as launched:
        yield launched


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    return tmp_path_factory.mktemp("arena_screenshots")


def printable(text: str) -> str:
    """The visible characters of a text: a tiny random model writes control characters, and whitespace
    around the odd characters it writes (line and paragraph separators among them) is laid out by the
    browser in ways its inner text does not repeat exactly."""
    return "".join(re.sub(r"[\x00-\x08\x0b-\x1f\x7f]", "", text).split())


def test_names_are_revealed_only_after_the_vote(app, browser, shots):
    url, db, names = app
    page = signed_in(browser, url, "alice")
    page.get_by_role("tab", name="Arena").click()
    page.locator("#arena-prompt-box textarea").fill(PROMPT)
    page.locator("#arena-send").click()
    page.wait_for_selector("#arena-vote-left:not([disabled])", timeout=60_000)  # both replies have ended
    assert page.locator("#arena-prompt .turn-user .text").inner_text() == PROMPT  # shown as text, not bold
    replies = [
        page.locator(f"#arena-{side} .turn-assistant .text").inner_text() for side in ("left", "right")
    ]
    assert all(replies)
    before = page.content()
    leaked = [name for ref, label in names.items() for name in (ref, label) if name in before]
    assert not leaked, f"model names on the page before the vote: {leaked}"
    assert page.locator("#arena-left-title").inner_text() == "Model A"
    page.screenshot(path=str(shots / "arena-before-vote.png"), full_page=True)

    page.locator("#arena-vote-left").click()
    page.wait_for_selector("#arena-status:has-text('Voted')")
    titles = [page.locator(f"#arena-{side}-title").inner_text() for side in ("left", "right")]
    shown = [next(ref for ref, label in names.items() if label in title) for title in titles]
    assert sorted(shown) == sorted(names) and titles[0].startswith("Model A: ")
    for verdict in ("left", "right", "tie", "both_bad"):
        assert page.locator(f"#arena-vote-{verdict}").is_disabled()  # locked once the names are out
    page.screenshot(path=str(shots / "arena-after-vote.png"), full_page=True)

    rows = sqlite3.connect(db.path).execute("SELECT kind, user, body FROM labels").fetchall()
    assert [(kind, user) for kind, user, _ in rows] == [("arena_vote", "alice")]
    body = json.loads(rows[0][2])
    assert body["verdict"] == "left" and body["mode"] == "anonymous"
    assert [body["left"]["artifact_id"], body["right"]["artifact_id"]] == shown
    # The page shows each stored reply.
    assert [printable(body["left"]["text"]), printable(body["right"]["text"])] == [
        printable(r) for r in replies
    ]
    assert body["prompt"] == [{"role": "user", "content": PROMPT}]

    page.get_by_role("tab", name="Leaderboard").click()
    page.wait_for_selector("#arena-summary:has-text('1 vote.')", timeout=30_000)
    table = page.locator("#arena-table").inner_text()
    assert all(label in table for label in names.values())
    page.screenshot(path=str(shots / "arena-leaderboard.png"), full_page=True)
    page.close()

"""The app in a real browser: headless Chromium (Debian's package) driven by Playwright for Python.

One served app and one browser for the module. Alice logs in, ranks a K = 4 task with a tie using only
the keyboard, and writes a two-turn demonstration; the database then holds exactly those two labels.
A completion that is an XSS attempt is shown as its text and runs nothing. A screenshot of each tab
is kept under the test's output folder.
"""

from __future__ import annotations

import json
import sqlite3

import pytest
from app_helpers import label_db, served
from browser_helpers import chromium, playwright_or_skip, signed_in

from pipeline.app import tasks
from pipeline.app.tasks import Completion, NewTask

XSS = '<img src=x onerror="window.__xss=1"><script>window.__xss=2</script> ${window.__xss=3} {{x}}'
PROMPT = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is 2 + 2? Reply *only* with a number."},
]
COMPLETIONS = ["4", "Four.", XSS, "2 + 2 = 5"]

playwright_api = playwright_or_skip()


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from pipeline.app.session import AppSettings
    from pipeline.store import ArtifactStore

    folder = tmp_path_factory.mktemp("browser_app")
    db = label_db(folder)
    tasks.add_tasks(db, [NewTask("rank", PROMPT, "t1", [Completion(text) for text in COMPLETIONS])])
    with served(AppSettings(db=db, store=ArtifactStore(folder / "store"))) as url:
        yield url, db


@pytest.fixture(scope="module")
def browser():
    with chromium(playwright_api) as launched:
        yield launched


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    return tmp_path_factory.mktemp("screenshots")


def test_keyboard_only_ranking_with_a_tie_and_an_xss_completion_shown_as_text(app, browser, shots):
    url, db = app
    page = signed_in(browser, url, "alice")
    page.wait_for_selector("#rank-status:has-text('Task 1')")
    lease = tasks.lease(db, "alice", "rank")  # the lease the page shows (asking again returns it)
    cards = page.locator("#rank-task .rank-slot .completion .text")
    assert cards.all_inner_texts() == lease.shown  # each exactly as the model wrote it
    assert page.evaluate("window.__xss") is None
    assert page.locator("#rank-task .turn-system .text").inner_text() == "Answer briefly."

    wanted = {"4": 1, "Four.": 1, XSS: 3, "2 + 2 = 5": 2}  # "4" and "Four." tied best
    page.locator("body").click(position={"x": 5, "y": 5})  # the page, not a field, has the focus
    for text in lease.shown:  # each digit places the focused response and moves to the next
        page.keyboard.press(str(wanted[text]))
    untruthful_slot = lease.shown.index("2 + 2 = 5")
    for _ in range(len(lease.shown) - 1 - untruthful_slot):
        page.keyboard.press("ArrowUp")
    page.keyboard.press("t")
    page.screenshot(path=str(shots / "rank.png"), full_page=True)
    page.keyboard.press("Control+Enter")
    page.wait_for_selector("#rank-status:has-text('Saved')")
    page.wait_for_selector("#rank-status:has-text('No ranking task left')")

    body, order = sqlite3.connect(db.path).execute("SELECT body, shown_order FROM labels").fetchone()
    body = json.loads(body)
    assert body["tiers"] == [wanted[text] for text in COMPLETIONS]
    assert body["flags"] == [["untruthful"] if text == "2 + 2 = 5" else [] for text in COMPLETIONS]
    assert json.loads(order) == lease.shown_order
    assert page.evaluate("window.__xss") is None
    page.close()


def test_a_two_turn_demonstration_written_in_the_write_tab(app, browser, shots):
    url, db = app
    page = signed_in(browser, url, "alice")
    page.get_by_role("tab", name="Write").click()
    turns = [("hi there", "Hello! How can I help?"), ("make it <b>shorter</b>", "Hi!")]
    for i, (user, reply) in enumerate(turns):
        page.locator("#write-user textarea").fill(user)
        page.locator("#write-assistant textarea").fill(reply)
        if i == 0:
            page.locator("#write-add").click()
            page.wait_for_selector("#write-dialogue .turn-assistant")
    page.screenshot(path=str(shots / "write.png"), full_page=True)
    assert page.locator("#write-dialogue .turn-user .text").inner_text() == "hi there"
    page.locator("#write-submit").click()
    page.wait_for_selector("#write-status:has-text('Saved the demonstration')")

    rows = sqlite3.connect(db.path).execute("SELECT kind, user, body FROM labels ORDER BY id").fetchall()
    assert [(kind, user) for kind, user, _ in rows] == [("ranking", "alice"), ("demonstration", "alice")]
    messages = json.loads(rows[1][2])["messages"]
    assert messages == [
        {"role": role, "content": text}
        for user, reply in turns
        for role, text in (("user", user), ("assistant", reply))
    ]
    page.get_by_role("tab", name="Progress").click()
    page.wait_for_selector("#progress-summary:has-text('rankings 1 · demonstrations 1')")
    page.screenshot(path=str(shots / "progress.png"), full_page=True)
    page.close()


def test_the_admin_tab_is_shown_to_admins_only(app, browser, shots):
    url, _ = app
    annotator = signed_in(browser, url, "carol")
    assert annotator.get_by_role("tab", name="Admin").count() == 0
    annotator.close()
    admin = signed_in(browser, url, "bob")
    admin.get_by_role("tab", name="Admin").click()
    admin.wait_for_selector("#admin-agreement:has-text('Agreement')")
    admin.screenshot(path=str(shots / "admin.png"), full_page=True)
    admin.close()

"""The README's screenshots of `rlhf app`: docs/labelling.png (Rank), docs/chat.png (Chat), docs/arena.png (Arena).

    .venv/bin/python docs/screenshots.py --store /tmp/demoA

The store needs at least one ppo artifact and one other chat model (the demo's chain has base, sft and ppo).
The app is served in-process, as the tests serve it, on a throwaway label database with one annotator and
one ranking task; the store is only read. Debian's Chromium (/usr/bin/chromium), driven by Playwright for
Python, signs in and takes each shot. Replies are kept short (48 new tokens) so the script takes seconds.
"""

from __future__ import annotations

import argparse
import secrets
import socket
import tempfile
import time
from pathlib import Path

import torch
from playwright.sync_api import sync_playwright

from pipeline.app import tasks
from pipeline.app.catalog import list_models
from pipeline.app.db import open_db
from pipeline.app.server import launch
from pipeline.app.session import AppSettings
from pipeline.app.tasks import Completion, NewTask
from pipeline.app.users import add_user
from pipeline.store import ArtifactStore

DOCS = Path(__file__).resolve().parent
CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"]
USER = "alice"
MAX_NEW_TOKENS = 48

EGG = "how long do i boil an egg for a jammy yolk"
RESPONSES = {  # each response and the tier it is put in before the shot (None: left unranked)
    "About 6-7 minutes for a large egg lowered into water that's already boiling, then straight into ice "
    "water for a couple of minutes. Six gives a runnier centre, seven a softer, jammier set.": 1,
    "Around 6 to 7 minutes in boiling water. Cool them in cold water afterwards so they stop cooking.": 1,
    "Great question! Eggs are one of the most versatile ingredients in the world. There are many ways to "
    "cook them, including boiling, poaching, frying and scrambling. Generally speaking, you'll want to boil "
    "your egg for somewhere between 3 and 12 minutes depending on how you like it. Happy cooking!": 2,
    "12 minutes, then peel them.": None,
}
SYSTEM = "You are a concise, friendly assistant."
CHAT = [
    "Give me three tips for staying focused while working from home.",
    "Which of them helps most with meetings?",
]
ARENA = "Give me three tips for a good night's sleep."


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def settings(store: ArtifactStore, folder: Path, password: str) -> AppSettings:
    """The app's settings: a new label database holding the annotator and the egg task."""
    db = open_db(folder / "labels.db", app_version="screenshots")
    add_user(db, USER, "annotator", password)
    task = NewTask("rank", [{"role": "user", "content": EGG}], "docs/screenshots.py", [])
    task.completions.extend(Completion(text) for text in RESPONSES)
    tasks.add_tasks(db, [task])
    return AppSettings(db=db, store=store)


def sign_in(browser, url: str, password: str):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    assert page.request.post(f"{url}/login", form={"username": USER, "password": password}).ok
    page.goto(url)
    page.wait_for_selector("#whoami:has-text('Signed in as')", timeout=60_000)
    return page


def shoot(page, name: str) -> None:
    page.mouse.move(0, 0)  # no hover highlight in the shot
    page.wait_for_timeout(500)  # let the last update settle
    assert page.locator("[data-testid='toast-body']").count() == 0, f"a message is shown over {name}"
    page.screenshot(path=str(DOCS / name), full_page=True)
    print(f"wrote {DOCS / name}")


def rank(page) -> None:
    """The Rank tab: the egg task, two responses tied in tier 1 and one in tier 2."""
    page.wait_for_selector("#rank-status:has-text('Task 1')")
    for slot in page.locator("#rank-task .rank-slot").all():
        tier = RESPONSES[slot.locator(".completion .text").inner_text()]
        if tier is not None:
            slot.locator(f".tiers label:has(input[value='{tier}'])").click()
    shoot(page, "labelling.png")


def set_max_new_tokens(page) -> None:
    box = page.locator("input[aria-label='number input for max_new_tokens']:visible")
    box.wait_for()
    page.wait_for_timeout(500)  # an accordion just opened re-renders its content once
    box.fill(str(MAX_NEW_TOKENS))
    box.press("Enter")
    slider = page.locator("input[aria-label='range slider for max_new_tokens']:visible")
    page.wait_for_function("([el, n]) => el.value === n", arg=[slider.element_handle(), str(MAX_NEW_TOKENS)])


def chat(page, model_id: str) -> None:
    """The Chat tab: two turns with `model_id`, each reply ending with its model and seed."""
    page.get_by_role("tab", name="Chat").click()
    page.locator("#chat-model input").click()
    page.locator("ul[role='listbox'] li", has_text=model_id).first.click()
    page.locator("#chat-system textarea").fill(SYSTEM)
    set_max_new_tokens(page)
    for i, message in enumerate(CHAT):
        page.locator("#chat-message textarea").fill(message)
        page.locator("#chat-send").click()
        replies = page.locator("#chat-log .message.bot", has_text=f"{model_id} · seed")
        replies.nth(i).wait_for(timeout=180_000)
    shoot(page, "chat.png")


def arena(page) -> None:
    """The Arena tab: two models drawn anonymously answer one prompt; a vote for A reveals their names."""
    page.get_by_role("tab", name="Arena").click()
    page.locator("button:visible", has_text="Sampling").click()  # the accordion
    set_max_new_tokens(page)
    page.locator("button:visible", has_text="Sampling").click()  # closed again for the shot
    page.locator("#arena-prompt-box textarea").fill(ARENA)
    page.locator("#arena-send").click()
    page.wait_for_selector("#arena-vote-left:not([disabled])", timeout=300_000)  # both replies ended
    page.locator("#arena-vote-left").click()
    page.wait_for_selector("#arena-status:has-text('Voted')")
    shoot(page, "arena.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True, help="artifact store with base/sft/ppo artifacts")
    args = parser.parse_args()
    started = time.monotonic()
    torch.set_num_threads(1)  # as `rlhf app` does by default
    store = ArtifactStore(args.store)
    ppo = next(entry for entry in list_models(store) if entry.stage == "ppo")  # the newest
    password = secrets.token_urlsafe(16)
    with tempfile.TemporaryDirectory() as folder:
        port = free_port()
        app = launch(settings(store, Path(folder), password), port=port, block=False)
        try:
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
                page = sign_in(browser, f"http://127.0.0.1:{port}", password)
                rank(page)
                chat(page, ppo.id)
                arena(page)
                browser.close()
        finally:
            app.close()
    print(f"done in {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()

"""The Chat and Runs tabs in a real browser (headless Chromium through Playwright), on the tiny artifact chain.

Alice chats with the ppo artifact (with the reward model scoring each reply), then with the sft artifact:
each reply is seen growing in the page while it streams, and ends with its model and score. The Runs tab
then draws the ppo run's curves. Screenshots are kept under the test's output folder.
"""

from __future__ import annotations

import pytest
from app_helpers import label_db, served
from browser_helpers import chromium, playwright_or_skip, signed_in

playwright_api = playwright_or_skip()

# Every change of the last reply's text while it streams, recorded in the page.
WATCH_REPLIES = """
() => {
  window.__replies = [];
  const log = document.querySelector('#chat-log');
  new MutationObserver(() => {
    const bots = log.querySelectorAll('.message.bot');
    if (bots.length) window.__replies.push(bots[bots.length - 1].innerText);
  }).observe(log, {subtree: true, childList: true, characterData: true});
}
"""


@pytest.fixture(scope="module")
def page(tmp_path_factory, artifact_chain):
    from pipeline.app.session import AppSettings

    db = label_db(tmp_path_factory.mktemp("browser_chat"))
    with served(AppSettings(db=db, store=artifact_chain.store, engine="hf")) as url:
        with chromium(playwright_api) as browser:
            yield signed_in(browser, url, "alice", height=1000)


def pick(page, dropdown: str, text: str) -> None:
    """Choose the option of a Gradio dropdown whose label contains `text`."""
    page.locator(f"{dropdown} input").click()
    page.locator("ul[role='listbox'] li", has_text=text).first.click()


def chat(page, message: str, model_id: str) -> list[str]:
    """Send `message`, wait for the reply to finish; every text the reply showed while streaming."""
    page.evaluate(WATCH_REPLIES)
    page.locator("#chat-message textarea").fill(message)
    page.locator("#chat-send").click()
    page.locator("#chat-log .message.bot", has_text=f"{model_id} · seed").last.wait_for(timeout=120_000)
    return page.evaluate("window.__replies")


def test_chat_with_two_artifacts_streams_and_the_runs_tab_plots(page, artifact_chain, tmp_path_factory):
    chain, shots = artifact_chain, tmp_path_factory.mktemp("screenshots")
    page.get_by_role("tab", name="Chat").click()
    pick(page, "#chat-model", chain.ppo.id)
    pick(page, "#chat-reward", chain.reward.id)
    seen = chat(page, "Hello! How can I help you today?", chain.ppo.id)
    growing = [text for text in dict.fromkeys(seen) if text.strip() and text.strip() != "…"]
    assert len(growing) >= 3, growing  # streamed: the reply was seen at several lengths before it ended
    assert "RM raw" in page.locator("#chat-log .message.bot").last.inner_text()
    pick(page, "#chat-model", chain.sft.id)
    seen = chat(page, "Tell me about Paris.", chain.sft.id)
    assert len([t for t in dict.fromkeys(seen) if t.strip()]) >= 3
    bots = page.locator("#chat-log .message.bot")
    assert bots.count() == 2 and chain.ppo.id in bots.nth(0).inner_text()
    page.screenshot(path=str(shots / "chat.png"), full_page=True)

    page.get_by_role("tab", name="Runs").click()
    pick(page, "#runs-artifact", chain.ppo.id)
    page.wait_for_selector("#runs-notes:has-text('metrics.jsonl in the artifact')", timeout=30_000)
    page.wait_for_selector("#runs-plots canvas, #runs-plots svg", timeout=30_000)
    assert page.locator("#runs-plots canvas, #runs-plots svg").count() >= 1
    page.screenshot(path=str(shots / "runs.png"), full_page=True)
    print(f"screenshots in {shots}")

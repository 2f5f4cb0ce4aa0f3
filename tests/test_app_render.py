"""What the labelling screens put into the page: every text escaped, so markup in model output is text."""

from __future__ import annotations

import html
import re

from pipeline.app.render import chat_html, escape_text, ranking_html

ATTACK = '<img src=x onerror="alert(1)"><script>alert(2)</script> ${alert(3)} {{x}} `y` & *bold*'


def visible_text(fragment: str) -> str:
    """What a browser shows for a fragment with no tags but ours: the entities decoded."""
    return html.unescape(re.sub(r"<[^>]+>", "", fragment))


def test_escaped_text_displays_exactly_and_contains_no_markup():
    escaped = escape_text(ATTACK)
    assert "<" not in escaped and ">" not in escaped and '"' not in escaped
    assert "$" not in escaped and "{" not in escaped and "`" not in escaped  # nothing a template can read
    assert html.unescape(escaped) == ATTACK


def test_chat_and_ranking_html_carry_only_our_own_tags():
    prompt = [{"role": "system", "content": "Be <b>brief</b>."}, {"role": "user", "content": ATTACK}]
    page = ranking_html(
        7, prompt, [ATTACK, "fine"], ["harmful"], tiers=[2, None], chosen_flags=[[], ["harmful"]]
    )
    tags = set(re.findall(r"<\s*([a-zA-Z]+)", page))
    assert tags <= {"div", "section", "fieldset", "legend", "label", "input", "span"}
    assert visible_text(chat_html(prompt)).count(ATTACK) == 1
    assert page.count('name="tier-7-0"') == 2 and page.count(" checked") == 2  # tier 2 of A, B's flag
    assert 'name="tier-7-0" value="2" checked' in page

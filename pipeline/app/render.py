"""Conversations and completions as HTML in which every character of model output and user text is text.

A labelling screen must show exactly what the model wrote: Markdown rendering would hide `*`, `#` and
HTML tags, and a sanitiser would silently drop a `<script>` the annotator ought to see and penalise.
So nothing is rendered: every text is HTML-escaped (`<`, `>`, `&`, quotes) and shown with
`white-space: pre-wrap`. `$`, `{` and `}` are escaped too, because gr.HTML fills its value into a
JavaScript template string (`${value}`) on the page; as character references they are inert there and
display unchanged.
"""

from __future__ import annotations

import html
from collections.abc import Sequence

from pipeline.app.tasks import SLOT_NAMES

ROLE_NAMES = {"system": "System", "user": "User", "assistant": "Assistant"}
_TEMPLATE_CHARACTERS = str.maketrans({"$": "&#36;", "{": "&#123;", "}": "&#125;", "`": "&#96;"})


def escape_text(text: str) -> str:
    """`text` as HTML that displays exactly `text` and runs nothing."""
    return html.escape(text, quote=True).translate(_TEMPLATE_CHARACTERS)


def chat_html(messages: Sequence[dict], *, empty: str = "") -> str:
    """A conversation as chat turns, one block per message, labelled with its role."""
    if not messages:
        return f'<div class="chat chat-empty">{escape_text(empty)}</div>'
    turns = "".join(
        f'<div class="turn turn-{escape_text(m["role"])}"><div class="role">{ROLE_NAMES.get(m["role"], "?")}</div>'
        f'<div class="text">{escape_text(m["content"])}</div></div>'
        for m in messages
    )
    return f'<div class="chat">{turns}</div>'


def ranking_html(
    task_id: int,
    prompt: Sequence[dict],
    completions: Sequence[str],
    flags: Sequence[str],
    *,
    tiers: Sequence[int | None] | None = None,
    chosen_flags: Sequence[Sequence[str]] | None = None,
) -> str:
    """A ranking task: the prompt as a chat, then one slot per completion with tier radios and flag boxes.

    The controls are plain form inputs; keyboard.js reads them into the tab's answer field. `tiers` and
    `chosen_flags` (by slot) pre-select a previous answer.
    """
    k = len(completions)
    tiers = tiers or [None] * k
    chosen_flags = chosen_flags or [[] for _ in range(k)]
    slots = []
    for slot, text in enumerate(completions):
        letter = SLOT_NAMES[slot]
        radios = "".join(
            f'<label><input type="radio" name="tier-{task_id}-{slot}" value="{tier}"'
            f"{' checked' if tiers[slot] == tier else ''}><span>{tier}</span></label>"
            for tier in range(1, k + 1)
        )
        boxes = "".join(
            f'<label><input type="checkbox" value="{escape_text(flag)}"'
            f"{' checked' if flag in chosen_flags[slot] else ''}><span>{escape_text(flag)}</span></label>"
            for flag in flags
        )
        slots.append(
            f'<section class="rank-slot" data-slot="{slot}"><div class="completion">'
            f'<div class="slot">Response {letter}</div><div class="text">{escape_text(text)}</div></div>'
            f'<div class="rank-controls"><fieldset class="tiers"><legend>Tier for {letter} (1 = best)</legend>'
            f'<div class="choices">{radios}</div></fieldset><fieldset class="flags"><legend>Flags</legend>'
            f'<div class="choices">{boxes}</div></fieldset></div></section>'
        )
    return (
        f'<div class="rank-task" data-task="{task_id}" data-k="{k}">{chat_html(prompt)}{"".join(slots)}</div>'
    )

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


def completion_html(slot: str, text: str) -> str:
    """One completion to rank, headed by its slot letter."""
    return (
        f'<div class="completion"><div class="slot">Response {escape_text(slot)}</div>'
        f'<div class="text">{escape_text(text)}</div></div>'
    )

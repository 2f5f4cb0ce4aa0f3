"""The Rank tab: one leased task at a time, the prompt as a chat, then K completions to put into tiers.

The task is one HTML block (render.ranking_html): each completion in a slot (A, B, ...) in the order
shuffled for this annotator, with tier radios (1 = best; equal tiers are ties) and flag boxes. Then a
note, and submit, skip and undo. keyboard.js keeps the tab's hidden answer field in step with the
slots, as JSON {"tiers": [int | null per slot], "flags": [[str] per slot]}, and drives the page from the
keyboard: digits place the focused slot, arrows move the focus, letters toggle its flags, Ctrl+Enter
submits. (One HTML block and one answer field rather than a Gradio radio per slot: a submit then moves
five values instead of fifty, which is most of its cost in Gradio.)

The lease key travels with the form (a hidden field read when the button is pressed), so a
double-clicked submit repeats the same key and stores one label, even though the first click has
already moved the form on to the next task. The server maps slots back to completions with the order
it recorded on the lease: the page cannot misattribute a tier.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import gradio as gr

from pipeline.app import tasks
from pipeline.app.db import LabelError
from pipeline.app.render import ranking_html
from pipeline.app.session import AppSettings, current_user, shown_as_error
from pipeline.app.tasks import FLAGS, Lease

SHORTCUTS = """**Keyboard:** `↑` `↓` (or `←` `→`) move between responses ·
`1`-`9` put the focused response in that tier and move on (equal tiers are ties) ·
`h` harmful, `t` untruthful, `e` not English, `r` not rankable ·
`Ctrl+Enter` submit · `Esc` leaves the note box."""


@dataclass
class RankTab:
    status: gr.Markdown
    task: gr.HTML
    answer: gr.Textbox
    note: gr.Textbox
    key: gr.Textbox
    last_key: gr.Textbox

    def task_outputs(self) -> list:
        return [self.status, self.task, self.answer, self.note, self.key]


def build(settings: AppSettings) -> RankTab:
    with gr.Row(equal_height=False):
        with gr.Column(scale=3, elem_id="rank-main"):
            status = gr.Markdown(elem_id="rank-status")
            task = gr.HTML(js_on_load=None, elem_id="rank-task")
            note = gr.Textbox(label="Note (optional)", lines=2, elem_id="rank-note")
            with gr.Row():
                submit = gr.Button("Submit  (Ctrl+Enter)", variant="primary", elem_id="rank-submit")
                skip = gr.Button("Skip", elem_id="rank-skip")
                undo = gr.Button("Undo last submission", elem_id="rank-undo")
            gr.Markdown(SHORTCUTS, elem_id="rank-shortcuts")
            answer = gr.Textbox(visible="hidden", elem_id="rank-answer")
            key = gr.Textbox(visible="hidden", elem_id="rank-key")
            last_key = gr.Textbox(visible="hidden", elem_id="rank-last-key")
        with gr.Column(scale=2, elem_id="guidelines"):
            with gr.Accordion("Guidelines", open=True):
                gr.Markdown(settings.guidelines)
    tab = RankTab(status, task, answer, note, key, last_key)

    def submit_ranking(request: gr.Request, lease_key: str, answer_json: str, note_text: str):
        user = current_user(settings, request)
        with shown_as_error():
            if not lease_key:
                raise LabelError("no task on the screen to submit")
            tiers, flags = parse_answer(answer_json)
            saved = tasks.submit_ranking(settings.db, user.name, lease_key, tiers, flags, note_text or "")
            following = tasks.lease(settings.db, user.name, "rank", lease_seconds=settings.lease_seconds)
        message = "Already saved" if saved.duplicate else f"Saved (label {saved.label_id})"
        return [*task_view(following, f"{message}. "), saved.key]

    def skip_task(request: gr.Request, lease_key: str):
        user = current_user(settings, request)
        if lease_key:
            tasks.skip(settings.db, user.name, lease_key)
        following = tasks.lease(settings.db, user.name, "rank", lease_seconds=settings.lease_seconds)
        return task_view(following, "Skipped. " if lease_key else "")

    def undo_ranking(request: gr.Request, last: str):
        user = current_user(settings, request)
        with shown_as_error():
            if not last:
                raise LabelError("nothing to undo yet in this session")
            again = tasks.undo(settings.db, user.name, last, lease_seconds=settings.lease_seconds)
        if again is None:
            following = tasks.lease(settings.db, user.name, "rank", lease_seconds=settings.lease_seconds)
            return [*task_view(following, "Undone. "), ""]
        return [*task_view(again, "Undone: here is that task again, as you ranked it. "), ""]

    outputs = tab.task_outputs()
    submit.click(
        submit_ranking, inputs=[key, answer, note], outputs=[*outputs, last_key], api_name="submit_ranking"
    )
    skip.click(skip_task, inputs=[key], outputs=outputs, api_name="skip_ranking")
    undo.click(undo_ranking, inputs=[last_key], outputs=[*outputs, last_key], api_name="undo_ranking")
    return tab


def parse_answer(answer_json: str) -> tuple[list[int | None], list[list[str]]]:
    """The answer field's tiers and flags, by slot; anything malformed is the page's fault, said plainly."""
    try:
        answer = json.loads(answer_json or "{}")
        tiers = [None if tier is None else int(tier) for tier in answer["tiers"]]
        flags = [[str(flag) for flag in slot] for slot in answer["flags"]]
    except (ValueError, TypeError, KeyError):
        raise LabelError("the page sent no readable ranking: reload it and rank the task again") from None
    return tiers, flags


def on_load(app: gr.Blocks, tab: RankTab, settings: AppSettings) -> None:
    def next_ranking(request: gr.Request):
        user = current_user(settings, request)
        return task_view(
            tasks.lease(settings.db, user.name, "rank", lease_seconds=settings.lease_seconds), ""
        )

    app.load(next_ranking, outputs=tab.task_outputs(), api_name="next_ranking")


def task_view(lease: Lease | None, message: str) -> list:
    """Values for RankTab.task_outputs(): the task in this annotator's order, or word of an empty queue."""
    if lease is None:
        status = (
            f"{message}**No ranking task left for you.** Check back later, or write demonstrations meanwhile."
        )
        return [status, "", "", "", ""]
    k = len(lease.shown)
    previous = lease.previous or {"tiers": [None] * k, "flags": [[] for _ in range(k)], "note": ""}
    status = f"{message}Task {lease.task_id} · {k} responses: place each in a tier, 1 is best; equal tiers are ties."
    html = ranking_html(
        lease.task_id,
        lease.prompt,
        lease.shown,
        FLAGS,
        tiers=previous["tiers"],
        chosen_flags=previous["flags"],
    )
    answer = json.dumps({"tiers": previous["tiers"], "flags": previous["flags"]})
    return [status, html, answer, previous["note"], lease.key]

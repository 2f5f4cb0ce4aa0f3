"""The Rank tab: one leased task at a time, the prompt as a chat, then K completions to put into tiers.

Each completion sits in a slot (A, B, ...) in the order shuffled for this annotator; a tier radio
(1 = best; equal tiers are ties) and flag boxes per slot; a note; submit, skip and undo. Nine slots are
laid out once and shown or hidden per task. keyboard.js drives the page from the keyboard: digits place
the focused slot, arrows move the focus, letters toggle its flags, Ctrl+Enter submits.

The lease key travels with the form (a hidden field read when the button is pressed), so a
double-clicked submit repeats the same key and stores one label, even though the first click has
already moved the form on to the next task. The server maps slots back to completions with the order
it recorded on the lease: the page cannot misattribute a tier.
"""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from pipeline.app import tasks
from pipeline.app.db import LabelError
from pipeline.app.render import chat_html, completion_html
from pipeline.app.server import AppSettings, current_user, shown_as_error
from pipeline.app.tasks import FLAGS, MAX_K, SLOT_NAMES, Lease

TIER_CHOICES = [str(tier) for tier in range(1, MAX_K + 1)]
SHORTCUTS = """**Keyboard:** `↑` `↓` (or `←` `→`) move between responses ·
`1`-`9` put the focused response in that tier (equal tiers are ties) ·
`h` harmful, `t` untruthful, `e` not English, `r` not rankable ·
`Ctrl+Enter` submit · `Esc` leaves the note box."""


@dataclass
class RankTab:
    status: gr.Markdown
    prompt: gr.HTML
    boxes: list[gr.Group]
    cards: list[gr.HTML]
    tiers: list[gr.Radio]
    flags: list[gr.CheckboxGroup]
    note: gr.Textbox
    key: gr.Textbox
    size: gr.Number
    last_key: gr.Textbox

    def task_outputs(self) -> list:
        return [
            self.status,
            self.prompt,
            *self.boxes,
            *self.cards,
            *self.tiers,
            *self.flags,
            self.note,
            self.key,
            self.size,
        ]


def build(settings: AppSettings) -> RankTab:
    with gr.Row(equal_height=False):
        with gr.Column(scale=3, elem_id="rank-main"):
            status = gr.Markdown(elem_id="rank-status")
            prompt = gr.HTML(js_on_load=None, elem_id="rank-prompt")
            boxes, cards, tiers, flags = [], [], [], []
            for i in range(MAX_K):
                with gr.Group(visible=False, elem_id=f"rank-slot-{i}", elem_classes="rank-slot") as box:
                    cards.append(gr.HTML(js_on_load=None))
                    with gr.Row():
                        # Every tier a task can have: Gradio checks a submitted value against these.
                        tiers.append(
                            gr.Radio(
                                choices=TIER_CHOICES,
                                label=f"Tier for {SLOT_NAMES[i]} (1 = best)",
                                elem_id=f"rank-tier-{i}",
                                elem_classes="rank-tier",
                                scale=3,
                            )
                        )
                        flags.append(
                            gr.CheckboxGroup(list(FLAGS), label="Flags", elem_id=f"rank-flags-{i}", scale=2)
                        )
                boxes.append(box)
            note = gr.Textbox(label="Note (optional)", lines=2, elem_id="rank-note")
            with gr.Row():
                submit = gr.Button("Submit  (Ctrl+Enter)", variant="primary", elem_id="rank-submit")
                skip = gr.Button("Skip", elem_id="rank-skip")
                undo = gr.Button("Undo last submission", elem_id="rank-undo")
            gr.Markdown(SHORTCUTS, elem_id="rank-shortcuts")
            key = gr.Textbox(visible="hidden", elem_id="rank-key")
            size = gr.Number(visible="hidden", precision=0, elem_id="rank-size")
            last_key = gr.Textbox(visible="hidden", elem_id="rank-last-key")
        with gr.Column(scale=2, elem_id="guidelines"):
            with gr.Accordion("Guidelines", open=True):
                gr.Markdown(settings.guidelines)
    tab = RankTab(status, prompt, boxes, cards, tiers, flags, note, key, size, last_key)

    def submit_ranking(request: gr.Request, lease_key: str, k: float, *values):
        user = current_user(settings, request)
        k = int(k or 0)
        tier_values, flag_values, note_value = values[:MAX_K], values[MAX_K : 2 * MAX_K], values[-1]
        with shown_as_error():
            if not lease_key:
                raise LabelError("no task on the screen to submit")
            saved = tasks.submit_ranking(
                settings.db,
                user.name,
                lease_key,
                [int(t) if t else None for t in tier_values[:k]],
                [list(f or []) for f in flag_values[:k]],
                note_value or "",
            )
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

    task_inputs = [key, size, *tiers, *flags, note]
    submit.click(
        submit_ranking, inputs=task_inputs, outputs=[*tab.task_outputs(), last_key], api_name="submit_ranking"
    )
    skip.click(skip_task, inputs=[key], outputs=tab.task_outputs(), api_name="skip_ranking")
    undo.click(
        undo_ranking, inputs=[last_key], outputs=[*tab.task_outputs(), last_key], api_name="undo_ranking"
    )
    return tab


def next_task(settings: AppSettings, request: gr.Request) -> list:
    user = current_user(settings, request)
    return task_view(tasks.lease(settings.db, user.name, "rank", lease_seconds=settings.lease_seconds), "")


def on_load(app: gr.Blocks, tab: RankTab, settings: AppSettings) -> None:
    def load_task(request: gr.Request):
        return next_task(settings, request)

    app.load(load_task, outputs=tab.task_outputs(), api_name="next_ranking")


def task_view(lease: Lease | None, message: str) -> list:
    """Updates for RankTab.task_outputs(): the task in the annotator's order, or an empty queue."""
    if lease is None:
        hidden = [gr.Group(visible=False)] * MAX_K
        return [
            f"{message}**No ranking task left for you.** Check back later, or write demonstrations meanwhile.",
            "",
            *hidden,
            *[""] * MAX_K,
            *[gr.Radio(value=None)] * MAX_K,
            *[gr.CheckboxGroup(value=[])] * MAX_K,
            "",
            "",
            0,
        ]
    k = len(lease.shown)
    previous = lease.previous or {"tiers": [None] * k, "flags": [[] for _ in range(k)], "note": ""}
    choices = [str(t) for t in range(1, k + 1)]
    return [
        f"{message}Task {lease.task_id} · {k} responses: place each in a tier, 1 is best; equal tiers are ties.",
        chat_html(lease.prompt),
        *[gr.Group(visible=i < k) for i in range(MAX_K)],
        *[completion_html(SLOT_NAMES[i], lease.shown[i]) if i < k else "" for i in range(MAX_K)],
        *[
            gr.Radio(
                choices=choices if i < k else TIER_CHOICES,
                value=str(previous["tiers"][i]) if i < k and previous["tiers"][i] else None,
            )
            for i in range(MAX_K)
        ],
        *[gr.CheckboxGroup(value=previous["flags"][i] if i < k else []) for i in range(MAX_K)],
        previous["note"],
        lease.key,
        k,
    ]

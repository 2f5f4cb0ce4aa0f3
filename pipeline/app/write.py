"""The Write tab: demonstrations written as dialogues, and prompts for PPO and new ranking tasks.

Three modes:
- Free dialogue: the trainer writes both sides, turn after turn, with an optional system message;
- Queued prompt: the next imported prompt (a leased writing task) is given, the trainer writes the reply
  (and may continue the dialogue);
- Prompt only: one user turn (and an optional system message), stored as a prompt record.

"Suggest" drafts the assistant reply with a chosen model, streamed into the reply box for the trainer to
edit; the demonstration records which models suggested drafts for it. A submitted dialogue is checked as
a conversation (or prompt) record by the pipeline's own validator before it is stored.

The dialogue so far lives on the server (`gr.State`); the submission key lives in the form, so a repeated
click repeats the key and stores one row.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import gradio as gr

from pipeline.app import tasks
from pipeline.app.db import LabelError
from pipeline.app.render import chat_html
from pipeline.app.session import AppSettings, current_user, shown_as_error
from pipeline.app.suggest import Suggester

FREE, QUEUED, PROMPT = "Free dialogue", "Queued prompt", "Prompt only"


@dataclass
class Draft:
    """A dialogue being written."""

    mode: str
    key: str
    """The submission key: the writing task's lease key, or a fresh one for a free dialogue or prompt."""
    messages: list[dict] = field(default_factory=list)
    """Turns added so far, the queued prompt first (without the system message)."""
    started: float = field(default_factory=time.time)
    suggested_by: list[str] = field(default_factory=list)
    empty_queue: bool = False


def new_draft(settings: AppSettings, user: str, mode: str) -> Draft:
    if mode != QUEUED:
        return Draft(mode, secrets.token_urlsafe(16))
    lease = tasks.lease(settings.db, user, "write", lease_seconds=settings.lease_seconds)
    if lease is None:
        return Draft(mode, "", empty_queue=True)
    return Draft(mode, lease.key, list(lease.prompt), started=lease.issued)


@dataclass
class WriteTab:
    mode: gr.Radio
    outputs: list
    start: Callable[..., list]
    """The handler that opens a new draft for the chosen mode."""


def build(settings: AppSettings) -> WriteTab:
    suggester = (
        Suggester(settings.store, settings.engine, settings.suggest_sampling, settings.seed)
        if settings.suggest_models
        else None
    )
    with gr.Row(equal_height=False):
        with gr.Column(scale=3):
            mode = gr.Radio([FREE, QUEUED, PROMPT], value=FREE, label="What to write", elem_id="write-mode")
            status = gr.Markdown(elem_id="write-status")
            system = gr.Textbox(label="System message (optional)", lines=1, elem_id="write-system")
            dialogue = gr.HTML(
                chat_html([], empty="No turns yet."), js_on_load=None, elem_id="write-dialogue"
            )
            user_box = gr.Textbox(label="User turn", lines=3, elem_id="write-user")
            assistant_box = gr.Textbox(label="Assistant reply", lines=6, elem_id="write-assistant")
            with gr.Row(visible=suggester is not None):
                model = gr.Dropdown(
                    settings.suggest_models,
                    value=(settings.suggest_models or [None])[0],
                    label="Suggest a reply with",
                    scale=3,
                )
                suggest = gr.Button("Suggest", elem_id="write-suggest", scale=1)
            with gr.Row():
                add = gr.Button("Add turn", elem_id="write-add")
                submit = gr.Button("Submit dialogue", variant="primary", elem_id="write-submit")
                restart = gr.Button("Start over", elem_id="write-restart")
            key = gr.Textbox(visible="hidden", elem_id="write-key")
            draft_state = gr.State()
        with gr.Column(scale=2):
            with gr.Accordion("Guidelines", open=False):
                gr.Markdown(settings.guidelines)

    view_outputs = [draft_state, key, status, system, dialogue, user_box, assistant_box, add]

    def view(draft: Draft, message: str = "") -> list:
        if draft.empty_queue:
            message += "**No queued prompt left for you.** Write a free dialogue meanwhile."
        elif draft.mode == QUEUED:
            message += "Write the assistant's reply to this prompt; add further turns if you like."
        elif draft.mode == PROMPT:
            message += "Write a prompt: one user turn that a good assistant could answer."
        return [
            draft,
            draft.key,
            message,
            gr.update(visible=draft.mode != QUEUED),
            chat_html(draft.messages, empty="No turns yet."),
            "",
            gr.update(value="", visible=draft.mode != PROMPT),
            gr.update(visible=draft.mode != PROMPT),
        ]

    def start(request: gr.Request, chosen: str):
        user = current_user(settings, request)
        return view(new_draft(settings, user.name, chosen))

    def add_turn(request: gr.Request, draft: Draft, user_text: str, reply: str):
        current_user(settings, request)
        if not user_text.strip() and not (draft.messages and draft.messages[-1]["role"] == "user"):
            raise gr.Error("write the user turn first")
        if not reply.strip():
            raise gr.Error("write the assistant's reply before adding the turn")
        pending = [{"role": "user", "content": user_text}] if user_text.strip() else []
        draft.messages = [*draft.messages, *pending, {"role": "assistant", "content": reply}]
        return view(draft)

    def submit_dialogue(
        request: gr.Request, form_key: str, draft: Draft, system_text: str, user_text: str, reply: str
    ):
        user = current_user(settings, request)
        messages = dialogue_with(draft, system_text, user_text, reply)
        with shown_as_error():
            if not form_key:
                raise LabelError("nothing to submit: pick what to write first")
            saved = tasks.submit_dialogue(
                settings.db,
                user.name,
                form_key,
                messages,
                as_prompt=draft.mode == PROMPT,
                seconds=time.time() - draft.started,
                suggested_by=draft.suggested_by,
            )
        what = "prompt" if draft.mode == PROMPT else "demonstration"
        message = "Already saved. " if saved.duplicate else f"Saved the {what} (label {saved.label_id}). "
        return view(new_draft(settings, user.name, draft.mode), message)

    def suggest_reply(request: gr.Request, draft: Draft, source: str, system_text: str, user_text: str):
        current_user(settings, request)
        if suggester is None or not source:
            raise gr.Error("no model to suggest with: start the app with --suggest-model REF")
        context = dialogue_with(draft, system_text, user_text, "")
        if not context or context[-1]["role"] != "user":
            raise gr.Error("write the user turn first: the suggestion answers it")
        text = ""
        with shown_as_error():
            for text in suggester.stream(source, context):
                yield text, draft
        draft.suggested_by = sorted({*draft.suggested_by, suggester.provenance(source)})
        yield text, draft

    mode.change(start, inputs=[mode], outputs=view_outputs, api_name="start_writing")
    restart.click(start, inputs=[mode], outputs=view_outputs, api_visibility="private")
    add.click(
        add_turn,
        inputs=[draft_state, user_box, assistant_box],
        outputs=view_outputs,
        api_visibility="private",
    )
    submit.click(
        submit_dialogue,
        inputs=[key, draft_state, system, user_box, assistant_box],
        outputs=view_outputs,
        api_name="submit_dialogue",
    )
    suggest.click(
        suggest_reply,
        inputs=[draft_state, model, system, user_box],
        outputs=[assistant_box, draft_state],
        api_name="suggest_reply",
        concurrency_limit=1,
    )
    return WriteTab(mode, view_outputs, start)


def on_load(app: gr.Blocks, tab: WriteTab) -> None:
    app.load(tab.start, inputs=[tab.mode], outputs=tab.outputs, api_visibility="private")


def dialogue_with(draft: Draft, system_text: str, user_text: str, reply: str) -> list[dict]:
    """The whole dialogue as it would be submitted: system message, turns so far, and the boxes' text."""
    messages = list(draft.messages)
    if draft.mode != QUEUED and system_text.strip():
        messages = [{"role": "system", "content": system_text}, *messages]
    if user_text.strip():
        messages.append({"role": "user", "content": user_text})
    if reply.strip():
        messages.append({"role": "assistant", "content": reply})
    return messages

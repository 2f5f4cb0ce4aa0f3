"""The Chat tab's core: streamed replies, reward scores as `rlhf reward score` gives them, ratings, and a
turn's replies sent to the ranking queue; and the chat served through gradio_client."""

from __future__ import annotations

import json
import re
import sqlite3

import pytest
import torch
from app_helpers import PASSWORDS, label_db, served
from conftest import seeded

from pipeline.app import tasks
from pipeline.app.catalog import ModelCache, RewardModels
from pipeline.app.chat_tab import (
    Answer,
    ChatSettings,
    Conversation,
    Turn,
    draw,
    rate,
    send_to_ranking,
)
from pipeline.app.session import AppSettings
from pipeline.chat import prompt_ids, stop_token_ids

pytestmark = pytest.mark.usefixtures("one_thread")

HELLO = [{"role": "user", "content": "Hello! How can I help you today?"}]


def scripted_model(tokenizer, out_dir, first: int, second: int, after: int):
    """A tiny Llama that greedily answers `after` with `first`, then `second`, then its stop token.

    Its layers add nothing (zero output projections), so the hidden state is the current token's embedding
    and the next token depends on the current one alone; the head maps each scripted token's normalised
    embedding to the token that must follow it.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    with seeded(5):
        model = LlamaForCausalLM(config)
    stop = stop_token_ids(tokenizer)[0]
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        embed = model.model.embed_tokens.weight
        for current, following in ((after, first), (first, second), (second, stop)):
            hidden = embed[current] / embed[current].pow(2).mean().add(config.rms_norm_eps).sqrt()
            model.lm_head.weight[following] = 10 * hidden
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def chat_settings(model: str, reward: str = "", **sampling) -> ChatSettings:
    values = dict(temperature=0.0, top_p=1.0, max_new_tokens=20, seed=0) | sampling
    return ChatSettings(model, reward, "", **values)


@pytest.mark.parametrize("engine", ["hf", "cpu-llama"])
def test_a_reply_streams_growing_and_stops_at_the_stop_token(engine, store, tiny_tokenizer, tmp_path):
    after = prompt_ids(tiny_tokenizer, HELLO)[-1]
    first, second = tiny_tokenizer.encode("Sure, here", add_special_tokens=False)[:2]
    base = store.publish(
        "base", scripted_model(tiny_tokenizer, tmp_path / "scripted", first, second, after), config={}
    )
    conversation = Conversation(turns=[Turn(HELLO[0]["content"])])
    cache = ModelCache(store, engine=engine)
    texts = [text for _, text in draw(conversation, 0, chat_settings(base.id), cache, RewardModels(store))]
    streamed = [t for t in texts[1:-1]]  # the first yield opens an empty bubble; the last ends the stream
    one, two = tiny_tokenizer.decode([first]), tiny_tokenizer.decode([first, second])
    # One text per token: the first word, both, and at the stop token the same text (it is not shown).
    assert texts[0] == "" and texts[-1] is None
    assert streamed == [one.strip(), two.strip(), two.strip()], streamed
    answer = conversation.turns[0].shown
    assert answer.text == two.strip() and answer.artifact_id == base.id
    assert answer.sampling == {"max_new_tokens": 20, "temperature": 0.0, "top_p": 1.0, "seed": 0}


def cli_scores(capsys, store, reward_id: str, prompt: str, completion: str) -> tuple[str, str]:
    from pipeline.cli import main as cli_main

    capsys.readouterr()
    assert cli_main(["reward", "score", "--artifact", reward_id, "--store", str(store.root),
                     "--prompt", prompt, "--completion", completion]) == 0  # fmt: skip
    row = capsys.readouterr().out.splitlines()[2].split()
    return row[0], row[1]


def test_the_reward_score_shown_is_what_rlhf_reward_score_prints(artifact_chain, capsys):
    chain = artifact_chain
    conversation = Conversation(turns=[Turn(HELLO[0]["content"])])
    chosen = chat_settings(chain.sft.id, chain.reward.id, temperature=1.0, max_new_tokens=8)
    for _ in draw(conversation, 0, chosen, ModelCache(chain.store, engine="hf"), RewardModels(chain.store)):
        pass
    answer = conversation.turns[0].shown
    assert answer.text and answer.score.reward_id == chain.reward.id
    raw, normalised = cli_scores(capsys, chain.store, chain.reward.id, HELLO[0]["content"], answer.text)
    shown = conversation.chatbot()[-1]["content"]
    assert f"RM raw {raw} · standardised {float(normalised):+.3f}" in shown, (shown, raw, normalised)
    card = json.loads((chain.store.local_path(chain.reward) / "rlhf_model.json").read_text())
    expected = (answer.score.raw - card["reward_mean"]) / card["reward_std"]
    assert answer.score.standardised == pytest.approx(expected, rel=1e-6)


@pytest.fixture()
def settings(tmp_path, artifact_chain):
    return AppSettings(db=label_db(tmp_path), store=artifact_chain.store)


def two_replies(settings: AppSettings) -> Conversation:
    conversation = Conversation(system="Be brief.", turns=[Turn(HELLO[0]["content"])])
    cache, rewards = ModelCache(settings.store, engine="hf"), RewardModels(settings.store)
    sft = next(a.id for a in settings.store.list("sft"))
    for _ in range(2):  # a regeneration: the second draw takes the next seed
        for _ in draw(conversation, 0, chat_settings(sft, temperature=1.0, max_new_tokens=8), cache, rewards):
            pass
    return conversation


def test_a_turn_with_regenerated_replies_becomes_a_ranking_task_once(settings):
    conversation = two_replies(settings)
    first, second = conversation.turns[0].answers
    assert (first.sampling["seed"], second.sampling["seed"]) == (0, 1) and first.text != second.text
    task_id = send_to_ranking(settings, conversation, "alice")
    assert send_to_ranking(settings, conversation, "alice") == task_id  # a second click queues nothing new
    lease = tasks.lease(settings.db, "carol", "rank")
    assert lease.task_id == task_id and sorted(lease.shown) == sorted([first.text, second.text])
    assert lease.prompt == [{"role": "system", "content": "Be brief."}, HELLO[0]]
    rows = (
        sqlite3.connect(settings.db.path)
        .execute(
            "SELECT text, model, artifact_id, sampling FROM completions WHERE task_id = ? ORDER BY position",
            (task_id,),
        )
        .fetchall()
    )
    assert [(r[0], r[1], r[2], json.loads(r[3])["seed"]) for r in rows] == [
        (first.text, first.ref, first.artifact_id, 0),
        (second.text, second.ref, second.artifact_id, 1),
    ]
    assert "sent to ranking as task" in conversation.chatbot()[-1]["content"]


def test_one_reply_is_not_enough_for_a_ranking_task(settings):
    from pipeline.app.db import LabelError

    conversation = two_replies(settings)
    del conversation.turns[0].answers[1:]
    with pytest.raises(LabelError, match="two different replies"):
        send_to_ranking(settings, conversation, "alice")


def test_a_thumb_is_stored_with_the_reply_and_a_changed_one_replaces_it(settings):
    conversation = two_replies(settings)
    rate(settings, conversation, 1, True, "alice")
    rate(settings, conversation, 1, False, "alice")
    db = sqlite3.connect(settings.db.path)
    live = db.execute("SELECT body FROM live_labels WHERE kind = 'chat_feedback'").fetchall()
    assert len(live) == 1 and db.execute("SELECT COUNT(*) FROM labels").fetchone()[0] == 2
    body = json.loads(live[0][0])
    shown = conversation.turns[0].shown
    assert body["rating"] == "down" and body["reply"]["text"] == shown.text
    assert body["reply"]["artifact_id"] == shown.artifact_id and body["prompt"][-1] == HELLO[0]


def text_of(content) -> str:
    """A Chatbot message's text as the client receives it (Gradio 6 sends a list of typed parts)."""
    if isinstance(content, str):
        return content
    return "".join(part["text"] for part in content if part.get("type") == "text")


def test_the_served_chat_streams_through_the_client(tmp_path, artifact_chain):
    from gradio_client import Client

    settings = AppSettings(db=label_db(tmp_path), store=artifact_chain.store, engine="hf")
    with served(settings) as url:
        alice = Client(url, auth=("alice", PASSWORDS["alice"]), verbose=False, download_files=False)
        # message, model, reward model, system prompt, temperature, top_p, max_new_tokens, seed
        job = alice.submit(
            HELLO[0]["content"], artifact_chain.ppo.id, "", "", 1.0, 1.0, 12, 7, api_name="/chat_send"
        )
        chats = [chat for chat, _message in job]
        replies = [text_of(chat[-1]["content"]) for chat in chats if len(chat) == 2]
        assert len(replies) >= 3  # streamed: an empty bubble, then the reply token by token
        final = replies[-1]
        assert re.search(rf"{artifact_chain.ppo.id} · seed 7", final), final
        text = final.split("\n\n<sub>")[0]
        assert any(r != final and text.startswith(r) for r in replies[1:-1] if r != "…")


class BrokenCache:
    """A model whose reply fails after a few words."""

    def stream(self, ref, messages, settings, seed):
        yield "Hello"
        raise RuntimeError("the model broke mid-reply")


def test_a_message_whose_reply_failed_is_not_kept():
    conversation = Conversation(turns=[Turn("Hi")])
    conversation.turns[0].answers.append(Answer("Hello!", "m", "m-id", {}))
    conversation.turns.append(Turn("And then?"))
    chosen = ChatSettings("m", "", "", 0.7, 0.9, 8, 0)
    with pytest.raises(RuntimeError, match="broke"):
        for _ in draw(conversation, 1, chosen, BrokenCache(), rewards=None):
            pass
    assert [turn.user for turn in conversation.turns] == [
        "Hi"
    ]  # the answered turn stays, the failed one goes
    assert conversation.prompt(0) == [{"role": "user", "content": "Hi"}]

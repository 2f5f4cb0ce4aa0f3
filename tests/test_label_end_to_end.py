"""From prompts to a reward model through people: import, generate, rank in the app, export, train.

On a tiny random model: prompts are imported, `rlhf label generate` samples K = 3 completions per
prompt from an `sft` checkpoint, two annotators rank them through the app's own event handlers (the
functions the Rank tab's buttons call) and one writes two demonstrations, `rlhf label export` publishes a
labels artifact, and the reward stage and SFT train on `labels:latest`. The reward artifact's lineage
names the labels artifact, whose lineage names the checkpoint that generated the completions.
"""

from __future__ import annotations

import json
import random
import sqlite3
from pathlib import Path

from conftest import DEMO_DATA, REPO

from pipeline.app.db import open_db
from pipeline.app.users import add_user
from pipeline.cli import main

PROMPTS = 10


def handler(app, api_name: str):
    """The function behind one of the app's events, as Gradio calls it."""
    return next(fn.fn for fn in app.fns.values() if fn.api_name == api_name)


def test_labels_from_the_app_train_the_reward_model_with_lineage(tmp_path, store, tiny_model_dir, capsys):
    import gradio as gr

    from pipeline.app.server import build_app
    from pipeline.app.session import AppSettings

    sft = store.publish("sft", tiny_model_dir, config={"test": True})
    prompts = tmp_path / "prompts.jsonl"
    lines = (DEMO_DATA / "prompts.jsonl").read_text().splitlines()[:PROMPTS]
    prompts.write_text("\n".join(lines) + "\n")
    at = ["--store", str(store.root)]
    assert main(["label", "import", str(prompts), *at]) == 0
    generate = ["label", "generate", "--policy", "sft:latest", "--prompts", str(prompts), "--k", "3"]
    assert main([*generate, "--max_new_tokens", "12", "--temperature", "1.0", "--overlap", "2", *at]) == 0
    assert f"queued {PROMPTS} ranking tasks" in capsys.readouterr().out

    db = open_db(Path(store.root) / "labels.db")
    for name in ("alice", "bob"):
        add_user(db, name, "annotator", f"{name}-password")
    app = build_app(AppSettings(db=db, store=store))
    next_ranking, submit = handler(app, "next_ranking"), handler(app, "submit_ranking")
    rng = random.Random(0)
    for name in ("alice", "bob"):
        request = gr.Request(username=name)
        shown = next_ranking(request)
        while key := shown[-1]:  # the lease key; empty once the queue is empty for this annotator
            k = shown[1].count('class="rank-slot"')
            tiers = [1, 2] + [rng.randint(1, k) for _ in range(k - 2)]  # at least one ranked pair each
            answer = json.dumps({"tiers": tiers, "flags": [[] for _ in range(k)]})
            *shown, undo_key = submit(request, key, answer, "")
            assert undo_key == key
    # Alice writes the reply to the first imported prompt, then a dialogue of her own.
    alice, start, write = (
        gr.Request(username="alice"),
        handler(app, "start_writing"),
        handler(app, "submit_dialogue"),
    )
    draft, key, *_ = start(alice, "Queued prompt")
    assert draft.messages == [json.loads(lines[0])["prompt"][0]]
    write(alice, key, draft, "", "", "Here is how.")
    draft, key, *_ = start(alice, "Free dialogue")
    write(alice, key, draft, "", "What is 2 + 2?", "4.")
    conn = sqlite3.connect(db.path)
    assert conn.execute("SELECT task_id FROM labels WHERE kind = 'demonstration'").fetchall() == [
        (1,),
        (None,),
    ]
    assert conn.execute("SELECT COUNT(*) FROM live_labels WHERE kind = 'ranking'").fetchone() == (
        2 * PROMPTS,
    )
    sampling = json.loads(conn.execute("SELECT sampling FROM completions LIMIT 1").fetchone()[0])
    assert sampling["max_new_tokens"] == 12 and sampling["temperature"] == 1.0

    assert main(["label", "export", *at]) == 0
    (labels,) = store.list("labels")
    assert labels.metrics["comparisons"] == 2 * PROMPTS and labels.metrics["agreement_items"] == PROMPTS
    assert {"artifact": sft.id, "role": "completions"} in labels.manifest["inputs"]

    config = REPO / "configs" / "reward-tiny-test.yaml"
    reward_args = [
        "reward",
        "--config",
        str(config),
        "--data",
        "labels:latest",
        "--max_steps",
        "4",
        "--normalise_limit",
        "8",
    ]
    assert main([*reward_args, "--output_dir", str(tmp_path / "runs"), *at]) == 0
    (reward,) = store.list("reward")
    lineage = store.lineage(reward)
    data = next(item for item in lineage["inputs"] if item.get("role") == "train")
    assert data["id"] == labels.id and data["stage"] == "labels"
    generated_by = [item for item in data["inputs"] if item.get("role") == "completions"]
    assert [item["id"] for item in generated_by] == [sft.id]
    assert reward.manifest["config"]["data"] == str(store.local_path(labels) / "comparisons.jsonl")

    # Stage 1 reads the same artifact's demonstrations.
    sft_args = [
        "sft",
        "--config",
        str(REPO / "configs" / "sft-tiny-test.yaml"),
        "--model",
        str(tiny_model_dir),
    ]
    assert (
        main([*sft_args, "--data", "labels:latest", "--max_steps", "1", "--output_dir", str(tmp_path), *at])
        == 0
    )
    trained = store.list("sft")[-1]
    assert trained.metrics["train_conversations"] + trained.metrics["eval_conversations"] == 2
    assert {"artifact": labels.id, "file": "conversations.jsonl"}.items() <= trained.manifest["inputs"][
        1
    ].items()


def test_suggest_streams_a_draft_that_the_demonstration_records(tmp_path, store, tiny_model_dir):
    import gradio as gr

    from pipeline.app.server import build_app
    from pipeline.app.session import AppSettings

    sft = store.publish("sft", tiny_model_dir, config={"test": True})
    db = open_db(tmp_path / "labels.db")
    add_user(db, "alice", "annotator", "alice-password")
    sampling = {"max_new_tokens": 16, "temperature": 1.0}
    app = build_app(AppSettings(db=db, store=store, suggest_models=["sft:latest"], suggest_sampling=sampling))
    request = gr.Request(username="alice")
    draft, key, *_ = handler(app, "start_writing")(request, "Free dialogue")
    drafts = list(handler(app, "suggest_reply")(request, draft, "sft:latest", "", "Tell me a joke."))
    texts = [text for text, _ in drafts]
    assert len(texts) >= 3 and len(texts[-1]) > len(texts[0])  # streamed: the reply grows as it comes
    reply = texts[-1] or "(edited)"
    handler(app, "submit_dialogue")(request, key, draft, "", "Tell me a joke.", reply)
    body = json.loads(sqlite3.connect(db.path).execute("SELECT body FROM labels").fetchone()[0])
    assert body["suggested_by"] == [sft.id]
    assert body["messages"] == [
        {"role": "user", "content": "Tell me a joke."},
        {"role": "assistant", "content": reply},
    ]

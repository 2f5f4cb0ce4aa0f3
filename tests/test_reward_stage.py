"""Stage 2 end to end on a tiny random Llama: training, the artifact, reloading, scoring, errors, launch.

The comparisons here carry an easily learnt preference (polite beats plain beats rude), so a model of
hidden size 32 learns it in a few dozen steps and held-out accuracy above chance is not luck.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from conftest import REPO, seeded

from pipeline.chat import tokenize_completion
from pipeline.cli import main as cli_main
from pipeline.models import load_reward_model, load_tokenizer, resolve_model, write_card
from pipeline.packed_attention import SharedPrefixRow
from pipeline.scoring import RewardScorer, score_completions
from pipeline.store import ArtifactStore
from stages.reward.groups import Group, batch_scores, bucket_batches, collate, tokenize_comparisons

CONFIG = REPO / "configs" / "reward-tiny-test.yaml"
ANSWERS = [
    ("how long do i boil an egg", "About seven minutes, then cold water."),
    ("What is the capital of France?", "The capital of France is Paris."),
    ("how do i reverse a list in python", "Use slicing: my_list[::-1] returns a new list."),
    ("At what temperature does water boil?", "Water boils at 100 degrees Celsius at sea level."),
    ("can you suggest a name for a cat", "How about Miso? It is short and friendly."),
    ("whats 15% of 240", "15% of 240 is 36."),
    ("Give me a tip for sleeping better.", "Keep the same bedtime every day, even at weekends."),
    ("how do I say thanks in Spanish", "You say gracias."),
]
# Rank 0 is best: the longer the list, the worse the manners.
STYLES = ["Happy to help! {}", "{}", "Ugh, fine. {}", "Ugh, fine. Whatever. {} Stop asking."]


def learnable_comparisons(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        question, answer = rng.choice(ANSWERS)
        k = rng.choice([2, 3, 4])
        order = rng.sample(range(k), k)
        records.append(
            {
                "prompt": [{"role": "user", "content": question}],
                "completions": [STYLES[i].format(answer) for i in order],
                "ranks": order,
            }
        )
    return records


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def publish_sft(store: ArtifactStore, model_dir: Path, card: dict | None = None) -> str:
    """The tiny model as an `sft` artifact (the SFT stage itself is tested elsewhere)."""
    if card is None:
        return store.publish("sft", model_dir, config={}).id
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(model_dir, tmp, dirs_exist_ok=True)
        write_card(Path(tmp), card)
        return store.publish("sft", tmp, config={}).id


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    """One training run shared by the tests that inspect its artifact."""
    root = tmp_path_factory.mktemp("reward")
    store = ArtifactStore(root / "store")
    sft_id = publish_sft(store, tiny_model_dir)
    records = learnable_comparisons(150, seed=1)
    records.append({**records[0], "ranks": [0] * len(records[0]["ranks"])})  # all tied: no pair
    records.append({**records[1], "ranks": [2] * len(records[1]["ranks"])})
    long_prompt = [{"role": "user", "content": "Please read this. " * 60 + "What is the capital of France?"}]
    records.append({**records[2], "prompt": long_prompt})
    data = write_jsonl(root / "comparisons.jsonl", records)
    demos = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": STYLES[i].format(a)}]}
        for q, a in ANSWERS
        for i in (0, 1)
    ]
    demo_file = write_jsonl(root / "demos.jsonl", demos)
    args = ["reward", "--config", str(CONFIG), "--store", str(store.root), "--model", sft_id]
    args += ["--data", str(data), "--normalise_on", str(demo_file)]
    args += ["--report_to", "tensorboard", "--output_dir", str(root / "runs")]
    assert cli_main(args) == 0
    (artifact,) = store.list("reward")
    return store, artifact, demos, root


def test_held_out_accuracy_beats_chance(trained):
    _, artifact, _, _ = trained
    metrics = artifact.metrics
    assert metrics["eval_accuracy"] >= 0.75, metrics  # chance is 0.5
    assert metrics["eval_kendall_tau"] > 0.5
    assert metrics["eval_margin"] > 0
    assert {"eval_accuracy_k2", "eval_accuracy_k3", "eval_accuracy_k4"} <= set(metrics)
    assert metrics["steps"] == 24 and metrics["train_loss"] < 0.6


def test_skipped_and_truncated_records_are_counted(trained):
    _, artifact, _, _ = trained
    assert artifact.metrics["skipped_no_pairs"] == 2
    assert artifact.metrics["truncated_prompts"] >= 2  # every completion of the long-prompt record
    assert artifact.metrics["train_groups"] + artifact.metrics["eval_groups"] == 151


def test_manifest_records_lineage_and_normalisation(trained):
    store, artifact, _, root = trained
    manifest = artifact.manifest
    roles = {i.get("role") for i in manifest["inputs"]}
    assert {"model", "train", "normalise"} <= roles
    assert manifest["config"]["loss"] == "pairwise"
    card = json.loads((store.local_path(artifact) / "rlhf_model.json").read_text())
    assert card["kind"] == "reward" and card["adapter_base"].startswith("sft-")
    assert card["reward_bias"] == pytest.approx(-card["reward_mean"])
    assert card["reward_std"] > 0 and card["chat_template"]
    for key in ("reward_mean", "reward_std", "reward_bias"):
        assert manifest["meta"][key] == pytest.approx(card[key])
    assert list((root / "runs").rglob("events.out.tfevents.*")), "TensorBoard events were not written"


def test_reloaded_model_scores_demonstrations_to_zero_mean(trained):
    store, artifact, demos, _ = trained
    resolved = resolve_model(artifact.id, store)
    scorer = RewardScorer(load_reward_model(resolved, store)).eval()
    tokenizer = load_tokenizer(resolved.path)
    scores = [
        score_completions(scorer, tokenizer, d["messages"][:1], [d["messages"][1]["content"]], 128)[0]
        for d in demos
    ]
    mean = sum(scores) / len(scores)
    # The manifest's mean was measured on the trained model before saving: reloading changes nothing.
    assert mean == pytest.approx(artifact.meta["reward_mean"], abs=1e-4)
    assert mean + artifact.meta["reward_bias"] == pytest.approx(0.0, abs=1e-4)


def test_scores_do_not_depend_on_padding_or_batch(trained):
    store, artifact, _, _ = trained
    resolved = resolve_model(artifact.id, store)
    scorer = RewardScorer(load_reward_model(resolved, store)).eval()
    tokenizer = load_tokenizer(resolved.path)
    prompt = [{"role": "user", "content": ANSWERS[0][0]}]
    short, long = STYLES[1].format(ANSWERS[0][1]), STYLES[3].format(ANSWERS[0][1])
    together = score_completions(scorer, tokenizer, prompt, [short, long], 128)
    alone = score_completions(scorer, tokenizer, prompt, [short], 128)
    assert together[0] == pytest.approx(alone[0], abs=1e-5)
    # Left padding with position ids from the mask gives the same score as right padding.
    row = tokenize_completion(tokenizer, prompt, short, 128).input_ids
    left = torch.tensor([[tokenizer.pad_token_id] * 5 + row])
    mask = torch.tensor([[0] * 5 + [1] * len(row)])
    with torch.no_grad():
        assert scorer(left, mask).item() == pytest.approx(alone[0], abs=1e-5)


def test_score_cli_prints_raw_and_normalised(trained, capsys):
    store, artifact, _, root = trained
    question, answer = ANSWERS[1]
    args = ["reward", "score", "--artifact", artifact.id, "--store", str(store.root), "--prompt", question]
    args += ["--completion", STYLES[0].format(answer), "--completion", STYLES[3].format(answer)]
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    lines = [line.split() for line in out.splitlines() if line.startswith("  ") and "raw" not in line]
    polite, rude = float(lines[0][0]), float(lines[1][0])
    assert polite > rude
    mean, std = artifact.meta["reward_mean"], artifact.meta["reward_std"]
    assert float(lines[0][1]) == pytest.approx((polite - mean) / std, abs=2e-3)

    score = ["reward", "score", "--store", str(store.root), "--artifact"]
    file = write_jsonl(root / "held.jsonl", learnable_comparisons(6, seed=99))
    assert cli_main([*score, "reward:latest", "--file", str(file)]) == 0
    assert "ranked pairs ordered as in the file" in capsys.readouterr().out

    # Prompt/completion lines: consecutive lines with the same prompt are scored as one group.
    lines = [{"prompt": question, "completion": STYLES[i].format(answer)} for i in (0, 2)]
    file = write_jsonl(root / "pc.jsonl", [*lines, {"prompt": ANSWERS[0][0], "completion": ANSWERS[0][1]}])
    assert cli_main([*score, artifact.id, "--file", str(file)]) == 0
    out = capsys.readouterr().out
    assert out.count("prompt: ") == 2 and "ranked pairs" not in out


def test_each_completion_is_forwarded_once_per_step(tiny_tokenizer, tiny_model_dir):
    records = learnable_comparisons(12, seed=3)
    groups, _ = tokenize_comparisons(tiny_tokenizer, records, 128)
    batches = bucket_batches(groups, 4, seed=0)
    seen = [tuple(row) for batch in batches for group in batch for row in group.rows]
    assert len(seen) == sum(len(r["completions"]) for r in records)  # every completion in exactly one batch
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    rows_forwarded = []
    model.get_input_embeddings().register_forward_hook(lambda m, i, o: rows_forwarded.append(o.shape[0]))
    scorer = RewardScorer(model)
    for batch in batches:
        packed = collate(batch, tiny_tokenizer.pad_token_id)
        scores = scorer(packed["input_ids"], packed["attention_mask"])
        k_total = sum(len(group.rows) for group in batch)
        assert scores.shape == (k_total,) and packed["ranks"].shape == (k_total,)
    # One forward per batch, of sum(K) rows: not the 2 * C(K, 2) rows of a pair expansion.
    assert rows_forwarded == [sum(len(g.rows) for g in batch) for batch in batches]


def test_bucketing_keeps_padding_low(tiny_tokenizer):
    records = learnable_comparisons(64, seed=5)
    records += [{**r, "prompt": [{"role": "user", "content": "word " * 40}]} for r in records[:32]]
    groups, _ = tokenize_comparisons(tiny_tokenizer, records, 256)
    batches = bucket_batches(groups, 8, seed=0)
    real = sum(len(row) for g in groups for row in g.rows)
    padded = sum(collate(b, 0)["input_ids"].numel() for b in batches)
    assert real / padded > 0.8


def test_prerendered_records_are_refused(tmp_path, store, tiny_model_dir, capsys):
    sft_id = publish_sft(store, tiny_model_dir)
    records = learnable_comparisons(10, seed=2)
    records[3]["prompt"][0]["content"] = "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
    data = write_jsonl(tmp_path / "rendered.jsonl", records)
    args = [
        "reward",
        "--config",
        str(CONFIG),
        "--store",
        str(store.root),
        "--model",
        sft_id,
        "--data",
        str(data),
    ]
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert "record 4 already contains chat markup '<|start_header_id|>'" in err
    assert "Llama 3" in err and "ChatML" in err and "converter" in err


def test_policy_without_a_chat_template_is_refused(tmp_path, store, tiny_model_dir, capsys):
    sft_id = publish_sft(store, tiny_model_dir, card={"kind": "causal_lm", "chat_template": None})
    data = write_jsonl(tmp_path / "c.jsonl", learnable_comparisons(10, seed=2))
    args = [
        "reward",
        "--config",
        str(CONFIG),
        "--store",
        str(store.root),
        "--model",
        sft_id,
        "--data",
        str(data),
    ]
    assert cli_main(args) == 2
    assert "records no chat template" in capsys.readouterr().err


def test_full_fine_tuning_with_plackett_luce_reloads_the_same(tmp_path, store, tiny_model_dir):
    sft_id = publish_sft(store, tiny_model_dir)
    train = write_jsonl(tmp_path / "train.jsonl", learnable_comparisons(48, seed=6))
    held = write_jsonl(tmp_path / "held.jsonl", learnable_comparisons(12, seed=7))
    args = [
        "reward",
        "--config",
        str(CONFIG),
        "--store",
        str(store.root),
        "--model",
        sft_id,
        "--data",
        str(train),
    ]
    args += [
        "--eval_data",
        str(held),
        "--loss",
        "plackett-luce",
        "--lora.enabled",
        "false",
        "--learning_rate",
        "3e-3",
    ]
    args += ["--normalise_on", "null", "--max_steps", "12", "--eval_every", "0"]
    assert cli_main(args) == 0
    (artifact,) = store.list("reward")
    assert artifact.metrics["eval_groups"] == 12 and artifact.metrics["eval_accuracy"] > 0.5
    resolved = resolve_model(artifact.id, store)
    assert "adapter_base" not in resolved.card  # full weights: loads on its own
    scorer = RewardScorer(load_reward_model(resolved, store)).eval()
    tokenizer = load_tokenizer(resolved.path)
    # Without demonstrations the best-ranked completion of each training prompt sets the normalisation.
    best = [
        score_completions(scorer, tokenizer, r["prompt"], [r["completions"][r["ranks"].index(0)]], 128)[0]
        for r in learnable_comparisons(48, seed=6)
    ]
    assert sum(best) / len(best) == pytest.approx(artifact.meta["reward_mean"], abs=1e-4)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"loss": "plackett-luce", "margin": True}, "margin applies to the pairwise loss only"),
        ({"loss": "listwise"}, "loss must be one of pairwise, plackett-luce"),
        ({"eval_fraction": 0.0}, "eval_fraction must be in (0, 1)"),
        ({"eval_limit": 0}, "eval_limit must be at least 1"),
        ({"max_steps": 0}, "max_steps must be positive or -1"),
    ],
)
def test_bad_settings_name_the_fix(values, message):
    from pipeline.config import ConfigError, build
    from stages.reward.train import Config

    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build(Config, {"data": "comparisons.jsonl"} | values, "reward.yaml")


def test_margin_is_read_per_record_only_when_asked(tiny_tokenizer):
    records = [{**learnable_comparisons(1, seed=8)[0], "margin": 1.5}]
    with_margin, _ = tokenize_comparisons(tiny_tokenizer, records, 128, use_margin=True)
    without, _ = tokenize_comparisons(tiny_tokenizer, records, 128)
    packed = collate(with_margin, tiny_tokenizer.pad_token_id)
    assert packed["margins"].tolist() == [1.5] * len(records[0]["completions"])
    assert without[0].margin == 0.0


def test_eval_limit_holds_out_a_seeded_subset_of_the_held_out_groups(tiny_tokenizer):
    from stages.reward.train import Config, load_groups

    data = str(REPO / "data" / "demo" / "comparisons.jsonl")
    _, everything, _ = load_groups(Config(data=data, eval_data=data, max_length=128), tiny_tokenizer)
    _, limited, _ = load_groups(
        Config(data=data, eval_data=data, max_length=128, eval_limit=7), tiny_tokenizer
    )
    _, again, _ = load_groups(Config(data=data, eval_data=data, max_length=128, eval_limit=7), tiny_tokenizer)
    key = lambda group: tuple(map(tuple, group.rows))  # noqa: E731
    assert len(everything) > 7 and len(limited) == 7
    assert {key(g) for g in limited} <= {key(g) for g in everything}
    assert [key(g) for g in limited] == [key(g) for g in again]


def test_a_shared_prefix_row_lays_each_prompt_out_once():
    # Groups: two rows sharing [1 2 3]; a group of one; a row that the other row extends.
    row = SharedPrefixRow.of([[[1, 2, 3, 4, 5], [1, 2, 3, 6]], [[7, 8]], [[9], [9, 10]]])
    assert row.input_ids.tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]]
    assert row.position_ids.tolist() == [[0, 1, 2, 3, 4, 3, 0, 1, 0, 1]]
    assert row.group_lengths == [6, 2, 2]
    assert row.last.tolist() == [4, 5, 7, 8, 9]
    # The second row's 6 sees the prompt and itself, not the first row's 4 and 5.
    assert row.masks[0].int().tolist() == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 0],
        [1, 1, 1, 0, 0, 1],
    ]
    assert row.masks[1].int().tolist() == [[1, 0], [1, 1]]
    assert row.masks[2].int().tolist() == [[1, 0], [1, 1]]


def test_sharing_prompts_gives_the_padded_scores_and_gradients(tiny_tokenizer, tiny_model_dir):
    from transformers import AutoModelForSequenceClassification

    from pipeline.packed_attention import use_packed_attention

    records = learnable_comparisons(10, seed=7)
    long_prompt = [{"role": "user", "content": "Please read this. " * 12 + ANSWERS[1][0]}]
    records.append({**records[0], "prompt": long_prompt})  # cut on the left, by each completion's length
    groups, counts = tokenize_comparisons(tiny_tokenizer, records, 64)
    assert counts.truncated_prompts > 0
    batch_groups = groups + [Group([groups[0].rows[0]], [0])]  # and a group of one
    with seeded(0):
        model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    use_packed_attention(model)
    scorer = RewardScorer(model)

    def scores_and_grads(share: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad()
        batch = collate(batch_groups, tiny_tokenizer.pad_token_id, share_prompts=share)
        scores = batch_scores(scorer, batch)
        scores.square().sum().backward()
        return scores.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    padded, padded_grads = scores_and_grads(share=False)
    shared, shared_grads = scores_and_grads(share=True)
    # The same sums in another order: equal to float32 rounding, relative to each tensor's largest entry.
    torch.testing.assert_close(shared, padded, rtol=0, atol=1e-5 * float(padded.abs().max()))
    assert shared_grads.keys() == padded_grads.keys()
    for name, grad in padded_grads.items():
        scale = float(grad.abs().max()) or 1.0
        torch.testing.assert_close(
            shared_grads[name], grad, rtol=0, atol=1e-4 * scale, msg=lambda m, n=name: f"{n}: {m}"
        )


def test_sharing_prompts_without_sdpa_attention_is_refused(tmp_path, store, tiny_model_dir, monkeypatch):
    from pipeline.models import ModelError
    from stages.reward import train

    monkeypatch.setattr(
        train, "use_packed_attention", lambda model: None
    )  # as if the model ran eager attention
    cfg = train.Config(model=str(tiny_model_dir), data="unused.jsonl", report_to="none")
    resolved = resolve_model(cfg.model, store)
    with pytest.raises(ModelError, match="set share_prompts: false"):
        train.build_model(cfg, resolved, load_tokenizer(resolved.path), store, torch.float32)

"""Model cards: the README.md every model artifact carries, from the same facts as its manifest."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import ModelCard

from pipeline.model_card import model_card


def test_stage_artifacts_carry_real_cards_not_peft_templates(artifact_chain):
    chain = artifact_chain
    for artifact in (chain.sft, chain.reward):
        text = (Path(artifact.uri) / "README.md").read_text()
        card = ModelCard(text)
        assert "More Information Needed" not in text, artifact.stage  # peft's template is replaced
        assert card.data.library_name == "peft" and {"rlhf-pipeline", "lora"} <= set(card.data.tags)
        assert f"this model  [{artifact.stage}]" in text and chain.base.id in text  # lineage down to the base
        for name, value in artifact.metrics.items():
            if isinstance(value, int) and not isinstance(value, bool):
                assert f"| `{name}` | {value} |" in text, name
        assert artifact.manifest["files"]["README.md"]  # published with the payload, checksummed
    sft = ModelCard.load(Path(chain.sft.uri) / "README.md")
    assert sft.data.pipeline_tag == "text-generation" and "sft" in sft.data.tags
    assert f"on {chain.sft.metrics['train_conversations']} conversations" in sft.text
    reward = ModelCard.load(Path(chain.reward.uri) / "README.md")
    assert reward.data.pipeline_tag == "text-classification" and "reward-model" in reward.data.tags
    assert f"(raw - {chain.reward.meta['reward_mean']:.4g})" in reward.text


def test_hub_sources_become_metadata_and_local_files_stay_in_the_body():
    inputs = [
        {"model": "HuggingFaceTB/SmolLM2-360M-Instruct", "role": "model"},
        {"dataset": "Anthropic/hh-rlhf", "role": "train"},
        {"dataset": "/data/mine.jsonl", "sha256": "ab" * 32, "role": "normalise"},
    ]
    config = {"model": "HuggingFaceTB/SmolLM2-360M-Instruct", "loss": "pairwise", "lora": {"enabled": False}}
    card = model_card(
        "reward", config=config, inputs=inputs, metrics={"eval_accuracy": 0.71234}, meta={},
        model={"kind": "reward", "reward_mean": 0.5, "reward_std": 2.0}, curve=[], store=None,
    )  # fmt: skip
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-360M-Instruct"
    assert card.data.base_model_relation == "finetune" and card.data.library_name == "transformers"
    assert card.data.datasets == ["Anthropic/hh-rlhf"]
    assert "dataset /data/mine.jsonl  sha256:abababababab  as normalise" in card.text
    assert "Held-out pairwise accuracy 0.7123" in card.text and "every weight trained" in card.text


def test_ppo_curve_has_a_table_per_prompt_set():
    curve = [
        {"step": 0, "eval/chat/score": -1.0, "eval/chat/win": 0.5, "eval/code/score": -2.0},
        {"step": 5, "eval/chat/score": 0.25, "eval/chat/win": 0.75, "eval/code/score": -1.5},
        {"step": 6, "score": 9.0},  # a training step without evaluation
    ]
    card = model_card(
        "ppo", config={}, inputs=[], metrics={}, meta={}, model={"kind": "causal_lm"}, curve=curve, store=None
    )
    chat = card.text.index("Prompt set `chat`")
    code = card.text.index("Prompt set `code`")
    assert "| 5 | 0.25 | ? | 0.75 | ? |" in card.text[chat:code]
    assert "| 5 | -1.5 | ? | ? | ? |" in card.text[code:] and "| 6 |" not in card.text

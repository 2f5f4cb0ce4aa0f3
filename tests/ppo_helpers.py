"""Artifacts and configs the PPO tests share: a tiny SFT policy and a reward model whose taste is known.

The reward model is built by hand rather than trained, so what PPO should learn is exact and the tests
are deterministic: it scores the share of "liked" tokens (even ids) in prompt + response. One attention
layer with zero query/key weights averages over every real token; its value/output projections carry a
"this token is liked" coordinate of the embedding into a residual coordinate the score head reads. A
second layer with zero weights passes the residual stream on unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml
from conftest import DEMO_DATA, build_tiny_llama, seeded

from pipeline.models import write_card
from pipeline.store import ArtifactStore

HIDDEN = 32
REWARD_MEAN, REWARD_STD = 1.05, 0.2


def liked_tokens(tokenizer) -> list[int]:
    special = set(tokenizer.all_special_ids)
    return [t for t in range(0, len(tokenizer), 2) if t not in special]


def build_liking_reward_model(tokenizer, out_dir: Path, *, strength: float = 3.0) -> Path:
    """A LlamaForSequenceClassification whose score rises with the share of liked tokens."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=2,  # the second is the identity (all zero): a layer above for critic_layers: 1
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with seeded(0):  # every weight is set below, but building draws from the global generator all the same
        model = LlamaForSequenceClassification(config)
    with torch.no_grad():
        for param in model.parameters():
            param.zero_()
        embeddings = model.model.embed_tokens.weight
        embeddings[:, 2] = 10.0  # a large shared coordinate keeps every RMS norm nearly the same
        embeddings[liked_tokens(tokenizer), 0] = 3.0  # coordinate 0: "liked"
        for norm in (
            model.model.norm,
            model.model.layers[0].input_layernorm,
            model.model.layers[0].post_attention_layernorm,
        ):
            norm.weight.fill_(1.0)
        attention = model.model.layers[0].self_attn
        attention.v_proj.weight[0, 0] = 1.0  # value head 0, dim 0 <- "liked"
        attention.o_proj.weight[1, 0] = 1.0  # residual coordinate 1 <- its average over the sequence
        model.score.weight[0, 1] = strength
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def build_peaked_policy(tokenizer, out_dir: Path) -> Path:
    """The conftest tiny Llama with embeddings scaled up, so next-token distributions are peaked like an LM's
    (entropy about 3 nats instead of a near-uniform ln(vocab)) and a LoRA adapter can move them."""
    from transformers import AutoModelForCausalLM

    build_tiny_llama(tokenizer, out_dir)
    model = AutoModelForCausalLM.from_pretrained(out_dir)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(10.0)
    model.save_pretrained(out_dir)
    return out_dir


def build_stopping_policy(tokenizer, out_dir: Path, *, push: float = 3.0) -> Path:
    """The peaked policy with its stop tokens' output rows moved along the mean last hidden state of the demo
    prompts, so that sampled replies end now and then (the peaked policy alone never stops in 12 tokens)."""
    from transformers import AutoModelForCausalLM

    from pipeline.chat import prompt_ids, stop_token_ids
    from pipeline.datasets import load_records

    build_peaked_policy(tokenizer, out_dir)
    model = AutoModelForCausalLM.from_pretrained(out_dir)
    prompts = load_records(DEMO_DATA / "prompts.jsonl", "prompt").records[:16]
    with torch.no_grad():
        hidden = [
            model(
                torch.tensor([prompt_ids(tokenizer, r["prompt"])[-48:]]), output_hidden_states=True
            ).hidden_states[-1][0]
            for r in prompts
        ]
        direction = torch.cat(hidden).mean(0)
        # Tied embeddings: the stop tokens' input rows move too, which nothing reads after a stop.
        for token in stop_token_ids(tokenizer):
            model.lm_head.weight[token] += push * direction / direction.norm() ** 2
    model.save_pretrained(out_dir)
    return out_dir


def publish_tiny_pair(store: ArtifactStore, policy_dir: Path, tokenizer, tmp_path: Path) -> tuple[str, str]:
    """Publish a tiny policy as an `sft` artifact and the liking reward model as a `reward` one."""
    sft = store.publish("sft", policy_dir, config={"test": True}, meta={})
    rm_dir = build_liking_reward_model(tokenizer, tmp_path / "liking_rm")
    write_card(
        rm_dir, {"kind": "reward", "reward_mean": REWARD_MEAN, "reward_std": REWARD_STD, "max_length": 256}
    )
    reward = store.publish("reward", rm_dir, config={"test": True}, meta={})
    return sft.id, reward.id


def randomise_adapter(model: torch.nn.Module, *, seed: int) -> None:
    """Give every LoRA factor random values from a local generator, so the adapter changes the outputs
    (peft starts B at zero) and is the same whatever the tests before drew from the global generator."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "lora_A" in name or "lora_B" in name:
                std = 0.1 if "lora_A" in name else 0.3
                param.copy_(torch.randn(param.shape, generator=generator) * std)


def liked_share(tokenizer, token_ids: list[int]) -> float:
    liked = set(liked_tokens(tokenizer))
    return sum(t in liked for t in token_ids) / max(len(token_ids), 1)


def write_config(path: Path, store: ArtifactStore, **overrides: Any) -> Path:
    """The tiny-test preset with the test's store, run folder and data, plus `overrides`."""
    preset = yaml.safe_load(
        (Path(__file__).resolve().parents[1] / "configs" / "ppo-tiny-test.yaml").read_text()
    )
    preset.update(
        store=str(store.root),
        output_dir=str(path.parent / "runs"),
        prompts=str(DEMO_DATA / "prompts.jsonl"),
        eval_prompts=str(DEMO_DATA / "eval_prompts.jsonl"),
        ptx_data=str(DEMO_DATA / "sft.jsonl"),
    )
    preset.update(overrides)
    path.write_text(yaml.safe_dump(preset), encoding="utf-8")
    return path

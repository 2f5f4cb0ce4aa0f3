"""A whole tiny pipeline (base -> sft -> reward -> ppo), run through the CLI, for the artifact tests to share.

The base reproduces the embedded model's pad trap: its tokenizer's pad is its end-of-turn token, and so is
its config's `pad_token_id` (SmolLM2 ships both that way). pipeline.chat gives the stages a pad of their own,
but an adapter artifact keeps its base's config, which is what an export must not pass on.
Every stage logs to TensorBoard and trackio, so the tracker tests read the same runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from conftest import DEMO_DATA, REPO, seeded
from ppo_helpers import write_config

from pipeline.cli import main as cli_main
from pipeline.store import Artifact, ArtifactStore

TRACKERS = "[tensorboard, trackio]"


@dataclass
class Chain:
    store: ArtifactStore
    base: Artifact
    sft: Artifact
    reward: Artifact
    ppo: Artifact
    runs: Path
    """The stages' output_dir: TensorBoard events in <runs>/<run name>; trackio projects named so too."""


def build_trap_base(tokenizer_dir: Path, out_dir: Path) -> Path:
    """A tiny Llama whose tokenizer and config both pad with the end-of-turn token, as SmolLM2's do.

    Its output head is not tied to the embeddings: a tiny random tied model greedily repeats the prompt's
    last token, and replies of one repeated newline would prove nothing when compared.
    """
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(tokenizer_dir))
    tokenizer.pad_token = tokenizer.eos_token  # <|im_end|>
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
    )  # fmt: skip
    with seeded(2):
        model = LlamaForCausalLM(config)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def build_chain(root: Path, tokenizer_dir: Path) -> Chain:
    store = ArtifactStore(root / "store")
    runs = root / "runs"
    base_dir = build_trap_base(tokenizer_dir, root / "trap-base")
    base = store.publish("base", base_dir, config={"source": str(base_dir)}, meta={"name": "tiny-trap"})
    common = ["--store", str(store.root), "--output_dir", str(runs), "--report_to", TRACKERS]
    sft_args = ["sft", "--config", str(REPO / "configs" / "sft-tiny-test.yaml"), "--model", base.id]
    sft_args += ["--data", str(DEMO_DATA / "sft.jsonl"), "--max_steps", "4", "--logging_every", "2"]
    sft_args += ["--lora.enabled", "true", "--lora.r", "4", "--lora.alpha", "8", *common]
    assert cli_main(sft_args) == 0
    sft = store.resolve("sft:latest")
    reward_args = ["reward", "--config", str(REPO / "configs" / "reward-tiny-test.yaml"), "--model", sft.id]
    reward_args += [
        "--data",
        str(DEMO_DATA / "comparisons.jsonl"),
        "--normalise_on",
        str(DEMO_DATA / "sft.jsonl"),
    ]
    reward_args += ["--max_steps", "4", "--eval_every", "2", *common]
    assert cli_main(reward_args) == 0
    reward = store.resolve("reward:latest")
    config = write_config(
        root / "ppo.yaml", store, policy=sft.id, reward=reward.id, steps=2, eval_every=1, eval_limit=4,
        sample_every=1, output_dir=str(runs), report_to=["tensorboard", "trackio"],
    )  # fmt: skip
    assert cli_main(["ppo", "--config", str(config)]) == 0
    ppo = store.resolve("ppo:latest")
    return Chain(store, base, sft, reward, ppo, runs)

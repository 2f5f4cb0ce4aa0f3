"""Stage 1: assistant-only masks, padding-free batches, and SFT end to end on a tiny model."""

from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import REPO

from pipeline.chat import tokenize_completion, tokenize_conversation
from pipeline.cli import main as cli_main
from pipeline.models import load_causal_lm, load_tokenizer, resolve_model
from pipeline.store import ArtifactStore
from stages.sft.train import IGNORE_INDEX, Config, run, split_holdout, tokenize_dataset

DIALOGUE = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
]


def write_conversations(path, n: int = 48, seed: int = 0):
    """Arithmetic dialogues: a pattern a tiny model learns within a few dozen steps."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as handle:
        for _ in range(n):
            a, b = rng.randint(1, 9), rng.randint(1, 9)
            messages = [
                {"role": "user", "content": f"What is {a} plus {b}?"},
                {"role": "assistant", "content": f"{a} plus {b} is {a + b}."},
            ]
            if rng.random() < 0.3:
                messages += [
                    {"role": "user", "content": "Thanks!"},
                    {"role": "assistant", "content": "You are welcome."},
                ]
            handle.write(json.dumps({"messages": messages}) + "\n")
    return path


def test_only_assistant_tokens_carry_loss(tiny_tokenizer):
    tokens = tokenize_conversation(tiny_tokenizer, DIALOGUE)
    trained = [t for t, m in zip(tokens.input_ids, tokens.assistant_mask, strict=True) if m]
    assert tiny_tokenizer.decode(trained) == "Hello! How can I help?<|im_end|>Blue.<|im_end|>"
    untrained = tiny_tokenizer.decode(
        [t for t, m in zip(tokens.input_ids, tokens.assistant_mask, strict=True) if not m]
    )
    assert "Be brief." in untrained and "Name a colour." in untrained and "Blue" not in untrained
    # The whole sequence is exactly the template's rendering: masking never changes what the model sees.
    full = tiny_tokenizer.apply_chat_template(DIALOGUE, tokenize=False)
    assert tiny_tokenizer.decode(tokens.input_ids) == full


def test_labels_are_ignored_outside_assistant_turns(tiny_tokenizer):
    dataset, dropped = tokenize_dataset([{"messages": DIALOGUE}], tiny_tokenizer, max_length=512)
    row = dataset[0]
    assert dropped == 0
    kept = [label for label in row["labels"] if label != IGNORE_INDEX]
    assert tiny_tokenizer.decode(kept).count("<|im_end|>") == 2
    assert row["labels"][0] == IGNORE_INDEX


def test_conversation_cut_before_any_reply_is_dropped(tiny_tokenizer):
    long_user = {"role": "user", "content": "word " * 200}
    dataset, dropped = tokenize_dataset(
        [{"messages": [long_user, {"role": "assistant", "content": "ok"}]}], tiny_tokenizer, max_length=16
    )
    assert len(dataset) == 0 and dropped == 1


def test_prompt_and_completion_tokenize_like_the_conversation(tiny_tokenizer):
    """The reward model's view of a reply is a prefix of what SFT trained on: no template drift."""
    conversation = tokenize_conversation(tiny_tokenizer, DIALOGUE[:3]).input_ids
    completion = tokenize_completion(tiny_tokenizer, DIALOGUE[:2], DIALOGUE[2]["content"])
    assert conversation[: len(completion.input_ids)] == completion.input_ids
    cut = tokenize_completion(tiny_tokenizer, DIALOGUE[:2], DIALOGUE[2]["content"], max_length=12)
    assert cut.truncated and len(cut.input_ids) == 12 and cut.input_ids[-3:] == completion.input_ids[-3:]


def test_split_holdout_is_deterministic_and_disjoint():
    records = [{"i": i} for i in range(40)]
    train, held = split_holdout(records, 0.1, seed=3)
    assert len(held) == 4 and len(train) == 36
    assert split_holdout(records, 0.1, seed=3) == (train, held)
    assert not {r["i"] for r in train} & {r["i"] for r in held}


@pytest.mark.parametrize("attention", ["sdpa", "packed_sdpa"])
def test_padding_free_row_gives_the_padded_batch_loss_and_gradients(
    tiny_model_dir, tiny_tokenizer, attention
):
    """One concatenated row with restarting positions must not let sequences attend to each other."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from pipeline.models import ResolvedModel
    from pipeline.packed_attention import PACKED_SDPA

    dataset, _ = tokenize_dataset(
        [{"messages": DIALOGUE}, {"messages": DIALOGUE[1:3]}, {"messages": DIALOGUE[:3]}], tiny_tokenizer, 512
    )
    examples = [dataset[i] for i in range(len(dataset))]
    packed = DataCollatorForLanguageModeling(pad_token_id=tiny_tokenizer.pad_token_id, padding_free=True)(
        examples
    )
    padded = DataCollatorForLanguageModeling(pad_token_id=tiny_tokenizer.pad_token_id)(examples)
    assert packed["input_ids"].shape[0] == 1 and tiny_tokenizer.pad_token_id not in packed["input_ids"]
    grads = []
    for batch, impl in ((packed, attention), (padded, "sdpa")):
        model = load_causal_lm(ResolvedModel(str(tiny_model_dir), {}, {}), store=None).eval()
        model.set_attn_implementation(impl)
        # Without a KV cache (SFTTrainer passes use_cache=False) stock sdpa reads the restarting position ids
        # as sequence boundaries and masks attention across them; packed_sdpa uses cu_seq_lens_q instead.
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_packed, grad_packed), (loss_padded, grad_padded) = grads
    torch.testing.assert_close(loss_packed, loss_padded, rtol=1e-5, atol=1e-5)
    assert_close_per_tensor(grad_packed, grad_padded, "the two attention kernels add in different orders")
    assert attention != PACKED_SDPA or "cu_seq_lens_q" in packed


@pytest.mark.parametrize("padding_free", [True, False])
def test_assistant_loss_equals_trl_loss_and_gradients(tmp_path, tiny_model_dir, tiny_tokenizer, padding_free):
    """Our one-pass loss over labelled positions against TRL's tiled one, on the same weights and batch."""
    from trl import SFTConfig, SFTTrainer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from pipeline.models import ResolvedModel
    from stages.sft.train import AssistantLossTrainer

    dataset, _ = tokenize_dataset(
        [{"messages": DIALOGUE}, {"messages": DIALOGUE[1:3]}, {"messages": DIALOGUE[:3]}], tiny_tokenizer, 512
    )
    collate = DataCollatorForLanguageModeling(tiny_tokenizer.pad_token_id, padding_free=padding_free)
    batch = collate([dataset[i] for i in range(len(dataset))])
    labelled = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    results = []
    for trainer_class in (SFTTrainer, AssistantLossTrainer):
        model = load_causal_lm(ResolvedModel(str(tiny_model_dir), {}, {}), store=None)
        args = SFTConfig(
            output_dir=str(tmp_path), report_to=[], padding_free=padding_free, max_length=None, bf16=False
        )
        trainer = trainer_class(
            model=model, args=args, train_dataset=dataset, processing_class=tiny_tokenizer
        )
        # A count larger than this batch's, as under gradient accumulation: both must divide by it.
        loss = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=torch.tensor(2 * labelled))
        loss.backward()
        accuracy = trainer._metrics["train"]["mean_token_accuracy"]
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, accuracy))
    (trl_loss, trl_grads, trl_accuracy), (our_loss, our_grads, our_accuracy) = results
    torch.testing.assert_close(our_loss, trl_loss, rtol=1e-5, atol=1e-6)
    assert our_loss > 0
    assert_close_per_tensor(our_grads, trl_grads, "TRL projects the vocabulary in tiles, we in one product")
    assert our_accuracy == pytest.approx(trl_accuracy)


def assert_close_per_tensor(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], why: str) -> None:
    """Equal up to float32 rounding where `why` says the sums run in different orders: a tolerance relative to
    each tensor's largest entry (an absolute one would sit below rounding for large tensors), named on failure."""
    assert ours.keys() == theirs.keys()
    for name, expected in theirs.items():
        scale = float(expected.abs().max())
        torch.testing.assert_close(
            ours[name],
            expected,
            rtol=1e-4,
            atol=1e-5 * scale,
            msg=lambda m, name=name: f"{name} ({why}): {m}",
        )


def tiny_config(tmp_path, model_dir, **overrides) -> Config:
    values = dict(
        store=str(tmp_path / "store"),
        model=str(model_dir),
        data=str(write_conversations(tmp_path / "conversations.jsonl")),
        lora={"enabled": False},
        learning_rate=3e-3,
        batch_size=8,
        max_steps=80,
        eval_fraction=0.15,
        report_to="none",
        warmup_steps=0,
        lr_scheduler="constant",
        logging_every=50,
        checkpoint_every=0,
        output_dir=str(tmp_path / "runs"),
    )
    values.update(overrides)
    from pipeline.config import build

    return build(Config, values, "test")


def test_sft_end_to_end_full_fine_tuning(tmp_path, tiny_model_dir, store):
    cfg = tiny_config(tmp_path, tiny_model_dir)
    artifact = run(cfg, store)
    assert artifact is not None and artifact.stage == "sft"
    metrics = artifact.metrics
    assert metrics["eval_loss"] < 0.8 * metrics["eval_loss_before"], metrics
    assert metrics["train_conversations"] + metrics["eval_conversations"] == 48

    reloaded_source = resolve_model(artifact.id, store)
    trained = load_causal_lm(reloaded_source, store)
    original = load_causal_lm(resolve_model(str(tiny_model_dir), store), store)
    changed = [
        name
        for (name, a), (_, b) in zip(trained.named_parameters(), original.named_parameters(), strict=True)
        if not torch.equal(a, b)
    ]
    assert len(changed) > 5

    tokenizer = load_tokenizer(reloaded_source.path)
    assert tokenizer.chat_template == load_tokenizer(str(tiny_model_dir)).chat_template
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 3 plus 4?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = trained.generate(**prompt, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    reply = tokenizer.decode(out[0, prompt["input_ids"].shape[1] :])
    assert "plus" in reply  # the pattern was learned well enough to show up in greedy decoding

    lineage = store.lineage(artifact)
    assert lineage["inputs"][1]["sha256"] and artifact.manifest["config"]["max_steps"] == 80


def test_sft_lora_artifact_reloads_with_merged_adapter(tmp_path, tiny_model_dir, store):
    cfg = tiny_config(
        tmp_path,
        tiny_model_dir,
        lora={"enabled": True, "r": 4, "alpha": 8},
        max_steps=6,
        report_to="tensorboard",
    )
    artifact = run(cfg, store)
    events = list((tmp_path / "runs").rglob("events.out.tfevents.*"))
    assert events, "TensorBoard is the default logger"
    # One folder per run, runs/sft-<time> (TensorBoard keeps the hyperparameters in a subfolder of it).
    (run_name,) = {e.relative_to(tmp_path / "runs").parts[0] for e in events}
    assert artifact.meta["run_dir"] == str((tmp_path / "runs" / run_name).resolve())
    files = set(artifact.manifest["files"])
    assert "adapter_config.json" in files and "rlhf_model.json" in files and "model.safetensors" not in files
    merged = load_causal_lm(resolve_model("sft:latest", store), store)
    base = load_causal_lm(resolve_model(str(tiny_model_dir), store), store)
    ids = torch.tensor([[1, 5, 9, 14, 20]])
    assert not torch.allclose(merged(ids).logits, base(ids).logits)


def test_cli_rejects_unknown_key_with_a_hint(tmp_path, capsys):
    code = cli_main(
        ["sft", "--config", str(REPO / "configs" / "sft-tiny-test.yaml"), "--learning_rat", "0.1"]
    )
    assert code == 2
    assert "did you mean 'learning_rate'" in capsys.readouterr().err


def test_trainer_args_pass_through_to_trl_and_bad_keys_are_named(tmp_path, tiny_model_dir):
    from pipeline.config import ConfigError
    from stages.sft.train import trainer_settings

    cfg = tiny_config(tmp_path, tiny_model_dir, trainer_args={"weight_decay": 0.1, "logging_steps": 3})
    settings = trainer_settings(cfg, tmp_path / "run", has_eval=True, dtype=torch.float32)
    assert settings.weight_decay == 0.1 and settings.logging_steps == 3 and settings.padding_free
    bad = tiny_config(tmp_path, tiny_model_dir, trainer_args={"weight_decy": 0.1})
    with pytest.raises(ConfigError, match="weight_decy"):
        trainer_settings(bad, tmp_path / "run", has_eval=True, dtype=torch.float32)


def test_activation_checkpointing_is_off_by_default_and_leaves_the_weights_unchanged(
    tmp_path, tiny_model_dir
):
    """Checkpointing trades a second forward pass for memory: same trained weights, twice the MLP calls."""
    layer_calls = []

    def count(module, args):  # inside a layer's forward: the recomputation calls it again
        if type(module).__name__.endswith("MLP"):
            layer_calls[-1] += 1

    weights = []
    hook = torch.nn.modules.module.register_module_forward_pre_hook(count)
    try:
        for checkpointing in (None, True):  # None: the default
            folder = tmp_path / str(checkpointing)
            folder.mkdir()
            overrides = {} if checkpointing is None else {"activation_checkpointing": checkpointing}
            cfg = tiny_config(folder, tiny_model_dir, max_steps=3, eval_fraction=0.0, **overrides)
            layer_calls.append(0)
            artifact = run(cfg, store := ArtifactStore(cfg.store))
            weights.append(load_causal_lm(resolve_model(artifact.id, store), store).state_dict())
    finally:
        hook.remove()
    assert layer_calls[1] == 2 * layer_calls[0] > 0, layer_calls
    assert_close_per_tensor(weights[1], weights[0], "the recomputed activations feed the same sums")

"""Model sources: the embedded GGUF converted once, folders, artifacts, tokenizer preparation, LoRA."""

from __future__ import annotations

import pytest
import torch
from conftest import seeded, write_tiny_gguf
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from pipeline.chat import CHATML_END, DEFAULT_CHAT_TEMPLATE, prepare_tokenizer
from pipeline.models import (
    EMBEDDED_MODEL,
    LoraSettings,
    ModelError,
    apply_lora,
    load_causal_lm,
    load_tokenizer,
    match_vocab,
    resolve_model,
    training_dtype,
)
from pipeline.store import ArtifactStore, StoreError


def test_embedded_model_converts_once_and_answers_as_the_model_does(tmp_path_factory):
    """The real embedded model (~40 s to convert): once per store, fp32, and still the model it was. The
    weights are compared exactly on a tiny GGUF file below; here the check is what a broken dequantisation
    or layout would lose, a correct greedy answer."""
    store = ArtifactStore(tmp_path_factory.mktemp("embedded") / "store")
    first = resolve_model(EMBEDDED_MODEL, store)
    again = resolve_model(EMBEDDED_MODEL, store)
    assert first.path == again.path and len(store.list("base")) == 1  # converted once, then reused
    converted = load_causal_lm(first, store).eval()
    tokenizer = load_tokenizer(first.path)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = converted.generate(
            **prompt, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    assert "Paris" in tokenizer.decode(out[0, prompt["input_ids"].shape[1] :])
    assert tokenizer.pad_token_id != tokenizer.eos_token_id and tokenizer.eos_token == CHATML_END
    card = ModelCard.load(f"{first.path}/README.md")  # the base artifact's model card knows the original
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct" and card.data.license == "apache-2.0"
    assert next(converted.parameters()).dtype == torch.float32


def test_a_gguf_file_converts_to_exactly_the_weights_and_tokenizer_it_holds(tmp_path, tiny_model_dir, store):
    """A GGUF file written from the tiny Llama (F32, Q and K rows in llama.cpp's rotary layout) converts back to
    the same logits and the same token ids, as one base artifact however often it is named."""
    gguf = write_tiny_gguf(tiny_model_dir, tmp_path / "tiny.gguf")
    first, again = resolve_model(str(gguf), store), resolve_model(str(gguf), store)
    assert first.path == again.path and len(store.list("base")) == 1
    converted = load_causal_lm(first, store).eval()
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 50, 99, 200, 7, 311]])
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, original(ids).logits, rtol=0, atol=0)
    text = "Hello! What is 3 plus 4?<|im_end|>"
    assert (
        load_tokenizer(first.path)(text)["input_ids"]
        == load_tokenizer(str(tiny_model_dir))(text)["input_ids"]
    )


def test_sources_resolve_to_folders_artifacts_or_hub_ids(tmp_path, tiny_model_dir, store):
    folder = resolve_model(str(tiny_model_dir), store)
    assert folder.path == str(tiny_model_dir.resolve()) and folder.lineage == {"model": folder.path}
    artifact = store.publish("sft", tiny_model_dir, config={})
    for ref in (artifact.id, "sft:latest", str(store.local_path(artifact))):
        resolved = resolve_model(ref, store)
        assert resolved.lineage == {"artifact": artifact.id, "role": "model"}
    assert resolve_model("some-org/some-model", store).path == "some-org/some-model"
    with pytest.raises(StoreError, match="no published 'reward' artifact"):
        resolve_model("reward:latest", store)
    with pytest.raises(ModelError, match="GGUF file not found"):
        resolve_model(str(tmp_path / "missing.gguf"), store)
    with pytest.raises(ModelError, match="neither a model folder"):
        resolve_model(str(tmp_path / "missing-folder"), store)


def test_tokenizer_without_template_gets_chatml_and_a_distinct_pad(tiny_tokenizer_dir):
    raw = PreTrainedTokenizerFast.from_pretrained(str(tiny_tokenizer_dir))
    raw.chat_template = None
    raw.pad_token = raw.eos_token
    before = len(raw)
    tokenizer = prepare_tokenizer(raw)
    assert tokenizer.chat_template == DEFAULT_CHAT_TEMPLATE
    assert tokenizer.pad_token_id != tokenizer.eos_token_id and tokenizer.padding_side == "left"
    assert len(tokenizer) == before  # the markers were already in the vocabulary; nothing added

    with seeded(0):  # a model built unseeded would shift every later test's draws from the global generator
        model = LlamaForCausalLM(LlamaConfig(vocab_size=before - 3, hidden_size=16, intermediate_size=32,
                                             num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))  # fmt: skip
    match_vocab(model, tokenizer)
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)
    assert model.config.pad_token_id == tokenizer.pad_token_id


def test_lora_trains_only_the_adapter_and_full_mode_trains_everything(tiny_model_dir, store):
    model = load_causal_lm(resolve_model(str(tiny_model_dir), store), store)
    total = sum(p.numel() for p in model.parameters())
    lora = apply_lora(model, LoraSettings(r=4, alpha=8))
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    full = load_causal_lm(resolve_model(str(tiny_model_dir), store), store)
    assert apply_lora(full, LoraSettings(enabled=False)) is full
    assert sum(p.numel() for p in full.parameters() if p.requires_grad) == total


def test_lora_on_the_top_layers_adapts_only_those():
    """top_layers: 2 of 4 puts the adapter on layers 2 and 3 only, and the layers below get no gradient."""
    with seeded(0):
        model = LlamaForCausalLM(
            LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                        num_attention_heads=2, num_key_value_heads=1)
        )  # fmt: skip
    lora = apply_lora(model, LoraSettings(r=4, top_layers=2))
    adapted = {int(n.split(".layers.")[1].split(".")[0]) for n, p in lora.named_parameters() if p.requires_grad}
    assert adapted == {2, 3}
    lora(input_ids=torch.arange(8)[None]).logits.sum().backward()
    below = [n for n, p in lora.named_parameters() if ".layers.1." in n and p.grad is not None]
    assert not below
    with pytest.raises(ModelError, match="below the model's 4 layers"):
        apply_lora(model, LoraSettings(top_layers=4))  # refused before anything is wrapped


def test_cpu_trains_in_fp32():
    assert training_dtype(torch.device("cpu")) == torch.float32

"""The sampling engines (pipeline.generation): the draw, the Llama decode step, and the engines against
each other and against the model's own forward pass."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import seeded
from ppo_helpers import build_peaked_policy, randomise_adapter
from torch import Tensor

from pipeline.chat import prompt_ids, stop_token_ids
from pipeline.generation import (
    SamplingSettings,
    choose_engine,
    left_pad,
    load_policy,
    make_engine,
    position_ids,
)
from pipeline.generation.panel_linear import KernelUnavailable, kernel_missing_reason
from pipeline.generation.sampling import CDF_BLOCK, nucleus, pick, truncate_at_stop
from pipeline.models import LoraSettings, ModelError, apply_lora, load_causal_lm, resolve_model

CPU = torch.device("cpu")
PROMPTS = [
    [{"role": "user", "content": "why do cats purr"}],
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "Answer in one sentence."}, {"role": "user", "content": "What is 2+2?"}],
]
KERNEL_MISSING = kernel_missing_reason()
# Engines that run on this machine; cpu-kernel only where the panel kernel builds (AVX-512, a compiler).
ENGINES = ["hf", "cpu-llama"] + ([] if KERNEL_MISSING else ["cpu-kernel"])


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a busy machine two threads spin waiting on each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    return build_peaked_policy(tiny_tokenizer, tmp_path_factory.mktemp("peaked_policy"))


def adapted_policy(policy_dir: Path, store):
    model = apply_lora(load_causal_lm(resolve_model(str(policy_dir), store), store), LoraSettings(r=4)).eval()
    randomise_adapter(model, seed=0)
    return model


def forward_logprobs(model, query: Tensor, mask: Tensor, response: Tensor, temperature: float) -> Tensor:
    """log p(response token | prefix) [B, R] from one forward pass over prompt + response."""
    ids = torch.cat([query, response], 1)
    full_mask = torch.cat([mask, torch.ones_like(response)], 1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=full_mask, position_ids=position_ids(full_mask)).logits
    logits = logits[:, query.shape[1] - 1 : -1].float() / temperature
    return torch.log_softmax(logits, -1).gather(-1, response[..., None]).squeeze(-1)


# -- the draw --------------------------------------------------------------------------------------


def test_sampling_draws_from_the_softmax_and_never_a_zero_probability_token():
    """The two-level inverse CDF against the probabilities it samples from, over blocks and a ragged end."""
    vocab = 3 * CDF_BLOCK + 7  # the last block is padding but for 7 entries
    logits = torch.full((vocab,), float("-inf"))
    support = torch.tensor([0, CDF_BLOCK - 1, CDF_BLOCK, 2 * CDF_BLOCK + 5, vocab - 1])
    logits[support] = torch.tensor([0.0, 1.0, -1.0, 2.0, 0.5])
    rows = 20_000
    settings = SamplingSettings(temperature=1.0)
    tokens, logprobs = pick(logits.expand(rows, vocab), settings, torch.Generator().manual_seed(0))
    assert set(tokens.tolist()) <= set(support.tolist())
    expected = torch.softmax(logits[support], -1)
    observed = torch.stack([(tokens == t).float().mean() for t in support])
    assert (observed - expected).abs().max() < 4 * (expected * (1 - expected) / rows).sqrt().max()
    torch.testing.assert_close(logprobs, torch.log_softmax(logits, -1)[tokens])
    greedy, _ = pick(logits[None], SamplingSettings(temperature=0.0), None)
    assert greedy.item() == 2 * CDF_BLOCK + 5


def test_top_p_keeps_the_smallest_set_reaching_it_and_renormalises():
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3]])
    # Sorted: 0.5 (mass before 0), 0.3 (before 0.5), 0.15 (before 0.8 >= 0.7: out), 0.05 (out).
    torch.testing.assert_close(nucleus(probs, 0.7), torch.tensor([[0.0, 0.625, 0.0, 0.375]]))
    torch.testing.assert_close(nucleus(probs, 0.01), torch.tensor([[0.0, 1.0, 0.0, 0.0]]))
    logits = probs.log().expand(4000, 4)
    tokens, logprobs = pick(logits, SamplingSettings(top_p=0.7), torch.Generator().manual_seed(0))
    assert set(tokens.tolist()) == {1, 3}
    torch.testing.assert_close(logprobs, torch.tensor([0.625, 0.375]).log()[(tokens == 3).long()])


def test_left_padding_positions_and_truncation_at_the_stop_token():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0, device=CPU)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert position_ids(mask).tolist() == [[0, 1, 2], [0, 0, 0]]
    response = torch.tensor([[4, 2, 9, 2], [4, 4, 4, 4]])
    kept, keep, ended = truncate_at_stop(response, stop_ids=[2], pad_id=0)
    assert kept.tolist() == [[4, 2, 0, 0], [4, 4, 4, 4]]  # the stop token stays, what follows is masked
    assert keep.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]] and ended.tolist() == [True, False]


# -- the engines -----------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
def test_an_engine_samples_what_the_model_gives_from_the_weights_of_the_last_sync(
    engine, store, policy_dir, tiny_tokenizer
):
    """The log-probs an engine reports are the adapted model's own (one forward pass over the result), a
    later weight change reaches the samples only through sync, and sampling leaves the model untouched."""
    model = adapted_policy(policy_dir, store)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    sampler = make_engine(
        engine, model, stop_ids=stop_token_ids(tiny_tokenizer), pad_id=tiny_tokenizer.pad_token_id
    )
    assert sampler.name == engine
    prompts = [prompt_ids(tiny_tokenizer, p) for p in PROMPTS]
    settings = SamplingSettings(max_new_tokens=10, temperature=0.8)
    sampler.sync(model)
    seq = sampler.sample(prompts, settings, torch.Generator().manual_seed(0))
    expected = forward_logprobs(model, seq.query, seq.query_mask, seq.response, 0.8) * seq.response_mask
    torch.testing.assert_close(seq.logprobs, expected, atol=1e-4, rtol=1e-4)
    assert seq.response_mask.sum() > 0

    with torch.no_grad():
        for name, param in model.named_parameters():  # a PPO update
            if "lora_B" in name:
                param.add_(0.5)
    stale = sampler.sample(prompts, settings, torch.Generator().manual_seed(0))
    assert torch.equal(stale.response, seq.response)  # no sync, no change
    sampler.sync(model)
    fresh = sampler.sample(prompts, settings, torch.Generator().manual_seed(0))
    assert not torch.equal(fresh.response, seq.response)
    expected = (
        forward_logprobs(model, fresh.query, fresh.query_mask, fresh.response, 0.8) * fresh.response_mask
    )
    torch.testing.assert_close(fresh.logprobs, expected, atol=1e-4, rtol=1e-4)
    for name, param in model.named_parameters():
        if "lora_B" not in name:
            assert torch.equal(param, before[name]), name


@pytest.mark.parametrize("engine", [e for e in ENGINES if e != "hf"])
def test_cpu_engines_draw_the_tokens_hf_draws(engine, store, policy_dir, tiny_tokenizer):
    """The same seeded rollout through `hf` and a CPU engine: the same tokens, the same log-probs on them."""
    model = adapted_policy(policy_dir, store)
    stop, pad = stop_token_ids(tiny_tokenizer), tiny_tokenizer.pad_token_id
    prompts = [prompt_ids(tiny_tokenizer, p) for p in PROMPTS]
    settings = SamplingSettings(max_new_tokens=12, temperature=1.0)
    rollouts = []
    for name in ("hf", engine):
        sampler = make_engine(name, model, stop_ids=stop, pad_id=pad)
        sampler.sync(model)
        rollouts.append(sampler.sample(prompts, settings, torch.Generator().manual_seed(3)))
    hf, ours = rollouts
    assert torch.equal(hf.response, ours.response)
    assert torch.equal(hf.response_mask, ours.response_mask) and torch.equal(hf.ended, ours.ended)
    torch.testing.assert_close(ours.logprobs, hf.logprobs, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("engine", ENGINES)
def test_a_stream_yields_the_tokens_a_batch_of_one_draws(engine, store, policy_dir, tiny_tokenizer):
    model = adapted_policy(policy_dir, store)
    sampler = make_engine(
        engine, model, stop_ids=stop_token_ids(tiny_tokenizer), pad_id=tiny_tokenizer.pad_token_id
    )
    sampler.sync(model)
    prompt = prompt_ids(tiny_tokenizer, PROMPTS[0])
    settings = SamplingSettings(max_new_tokens=16, temperature=1.0, top_p=0.9)
    streamed = list(sampler.stream(prompt, settings, torch.Generator().manual_seed(5)))
    seq = sampler.sample([prompt], settings, torch.Generator().manual_seed(5))
    assert streamed == seq.response[0, : int(seq.response_mask[0].sum())].tolist()


def test_auto_picks_by_the_fixed_rule_and_cpu_engines_refuse_what_they_cannot_run(store, policy_dir):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    llama = load_causal_lm(resolve_model(str(policy_dir), store), store)
    assert choose_engine("auto", llama) == ("cpu-llama" if KERNEL_MISSING else "cpu-kernel")
    config = Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
    with seeded(0):
        qwen = Qwen2ForCausalLM(config)
    assert choose_engine("auto", qwen) == "hf"
    assert choose_engine("auto", llama.to(torch.bfloat16)) == "hf"
    with pytest.raises(ModelError, match="Llama-architecture model.*rollout_engine: hf"):
        make_engine("cpu-llama", qwen, stop_ids=[1], pad_id=0)
    if KERNEL_MISSING:
        with pytest.raises(KernelUnavailable, match="AVX-512"):
            make_engine("cpu-kernel", llama.float(), stop_ids=[1], pad_id=0)


@pytest.mark.parametrize("engine", ENGINES)
def test_the_hf_engine_decodes_other_architectures(engine, tiny_tokenizer):
    """A Qwen2 (q/k/v biases) through `hf`; the CPU engines refuse it (above)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if engine != "hf":
        pytest.skip("the CPU engines run Llamas only")
    config = Qwen2Config(
        vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, pad_token_id=tiny_tokenizer.pad_token_id,
    )  # fmt: skip
    with seeded(0):
        model = apply_lora(Qwen2ForCausalLM(config), LoraSettings(r=4)).eval()
    randomise_adapter(model, seed=0)
    sampler = make_engine("hf", model, stop_ids=[], pad_id=tiny_tokenizer.pad_token_id)
    sampler.sync(model)
    seq = sampler.sample([prompt_ids(tiny_tokenizer, PROMPTS[0]), [5, 9]], SamplingSettings(max_new_tokens=6),
                         torch.Generator().manual_seed(0))  # fmt: skip
    expected = forward_logprobs(model, seq.query, seq.query_mask, seq.response, 1.0)
    torch.testing.assert_close(seq.logprobs, expected, atol=1e-4, rtol=1e-4)


def test_a_loaded_policy_answers_conversations_as_text(store, policy_dir, tiny_tokenizer):
    policy = load_policy(str(policy_dir), store, engine="hf")
    settings = SamplingSettings(max_new_tokens=8, temperature=1.0)
    texts = policy.replies(PROMPTS, settings, seed=1)
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
    assert policy.replies(PROMPTS, settings, seed=1) == texts  # seeded
    # A stream is a batch of one: the same seed draws what a batch holding only that prompt draws.
    grown = list(policy.stream(PROMPTS[0], settings, seed=1))
    assert len(grown) > 1 and grown[-1] == policy.replies(PROMPTS[:1], settings, seed=1)[0]


# -- the Llama decode step and the panel kernel ----------------------------------------------------


def decode_logits(decoder, query, mask, tokens: Tensor) -> Tensor:
    """Logits after the prompt and after each of `tokens` [B, S], fed in turn: [B, S + 1, V]."""
    logits = [decoder.prefill(query, mask, tokens.shape[1])]
    logits += [decoder.step(tokens[:, i]) for i in range(tokens.shape[1])]
    return torch.stack(logits, dim=1)


def forward_logits(model, query, mask, tokens: Tensor) -> Tensor:
    """The same logits as decode_logits from one forward pass over prompt + tokens."""
    ids = torch.cat([query, tokens], 1)
    full_mask = torch.cat([mask, torch.ones_like(tokens)], 1)
    out = model(input_ids=ids, attention_mask=full_mask, position_ids=position_ids(full_mask)).logits
    return out[:, query.shape[1] - 1 :]


def panel_kernel_or_skip() -> None:
    if KERNEL_MISSING:
        pytest.skip(f"the panel kernel cannot run here: {KERNEL_MISSING}")
    from pipeline.generation.panel_linear import build_kernel

    build_kernel()


@pytest.mark.parametrize(
    ("parts", "rows", "lora"),
    [
        ([576, 192, 192], 8, False),
        ([576, 192, 192], 8, True),
        ([40, 8], 13, True),
        ([17], 1, False),
        ([33, 31], 3, True),
    ],
)
def test_panel_linear_equals_a_plain_linear(parts, rows, lora):
    """Outputs stacked from several weights with their LoRA updates merged in, padded to whole panels, rows
    in blocks of 8 and a remainder."""
    from pipeline.generation.panel_linear import LowRank, PanelLinear

    panel_kernel_or_skip()
    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(n, 24, generator=generator) for n in parts]
    updates = [None] * len(parts)
    if lora:
        updates = [
            LowRank(torch.randn(n, 4, generator=generator), torch.randn(4, 24, generator=generator), 0.5)
            for n in parts
        ]
    bias = torch.randn(sum(parts), generator=generator)
    x = torch.randn(2, rows, 24, generator=generator)
    merged = [w if u is None else w + 0.5 * u.b @ u.a for w, u in zip(weights, updates, strict=True)]
    expected = torch.nn.functional.linear(x, torch.cat(merged), bias)
    layer = PanelLinear(list(zip(weights, updates, strict=True)), bias)
    torch.testing.assert_close(layer(x), expected, atol=1e-4, rtol=1e-5)


def test_a_kernel_that_cannot_build_is_refused_naming_the_reason(monkeypatch):
    import torch.utils.cpp_extension

    from pipeline.generation import panel_linear

    def no_compiler(**kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    monkeypatch.setattr(panel_linear, "kernel_missing_reason", lambda: None)
    with pytest.raises(KernelUnavailable, match="no C\\+\\+ compiler.*rollout_engine: cpu-llama"):
        panel_linear.build_kernel()


def test_each_environment_keeps_its_own_kernel_build(monkeypatch, tmp_path):
    """Two virtualenvs (two clones) must not rebuild over each other's cached kernel; one keeps one folder."""
    from pipeline.generation import panel_linear

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(sys, "prefix", "/clone-a/.venv")
    first, again = panel_linear.build_directory(), panel_linear.build_directory()
    monkeypatch.setattr(sys, "prefix", "/clone-b/.venv")
    other = panel_linear.build_directory()
    assert first == again
    assert first != other
    assert first.parent == tmp_path


@pytest.mark.parametrize("layout", ["panels", "onednn"])
@pytest.mark.parametrize("adapter", ["merged", "disabled"])
def test_llama_decoder_gives_the_transformers_logits(store, tiny_model_dir, tiny_tokenizer, adapter, layout):
    """Our written-out Llama step (fused, packed, preallocated cache) against the model's own forward."""
    from pipeline.generation.llama import LlamaDecoder
    from pipeline.generation.panel_linear import PanelLinear

    if layout == "panels":
        panel_kernel_or_skip()
    model = adapted_policy(tiny_model_dir, store)
    prompts = [prompt_ids(tiny_tokenizer, PROMPTS[0]), [5, 9, 11]]  # left padding on the second row
    query, mask = left_pad(prompts, tiny_tokenizer.pad_token_id, CPU)
    tokens = torch.randint(3, len(tiny_tokenizer), (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        if adapter == "disabled":  # the frozen reference: the same trunk without its adapter
            with model.disable_adapter():
                decoder = LlamaDecoder(model.get_base_model(), layout)
                ours = decode_logits(decoder, query, mask, tokens)
                theirs = forward_logits(model, query, mask, tokens)
        else:
            decoder = LlamaDecoder(model.get_base_model(), layout)
            ours = decode_logits(decoder, query, mask, tokens)
            theirs = forward_logits(model, query, mask, tokens)
            with model.disable_adapter():
                without = forward_logits(model, query, mask, tokens)
            assert (ours - without).abs().max() > 1e-2  # the adapter changes the logits: it was merged in
    assert isinstance(decoder.blocks[0].qkv, PanelLinear) == (layout == "panels")
    assert decoder.whole_layers == (layout == "panels")  # each step's layers one decode_layer call each
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_the_next_sync_lays_the_new_weights_out_in_the_last_ones_panels(
    store, tiny_model_dir, tiny_tokenizer
):
    panel_kernel_or_skip()
    model = adapted_policy(tiny_model_dir, store)
    sampler = make_engine("cpu-kernel", model, stop_ids=stop_token_ids(tiny_tokenizer),
                          pad_id=tiny_tokenizer.pad_token_id)  # fmt: skip
    query, mask = left_pad(
        [prompt_ids(tiny_tokenizer, PROMPTS[0]), [5, 9, 11]], tiny_tokenizer.pad_token_id, CPU
    )
    tokens = torch.randint(3, len(tiny_tokenizer), (2, 4), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sampler.sync(model)
        before = decode_logits(sampler.decoder, query, mask, tokens)
        panels = {id(t) for t in sampler.decoder.panel_tensors()}
        for name, param in model.named_parameters():  # a PPO update in between
            if "lora_B" in name:
                param.add_(0.2)
        sampler.sync(model)
        assert {id(t) for t in sampler.decoder.panel_tensors()} == panels
        after = decode_logits(sampler.decoder, query, mask, tokens)
        expected = forward_logits(model, query, mask, tokens)
    assert (after - before).abs().max() > 1e-2
    torch.testing.assert_close(after, expected, atol=1e-4, rtol=1e-4)


def test_the_hf_engine_gathers_a_sharded_policy(tmp_path):
    """FSDP2 shards over 2 gloo processes: `auto` picks hf, and it samples what the whole policy samples."""
    import json
    import subprocess
    import sys

    from conftest import REPO, free_port

    out = tmp_path / "result.json"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
        str(REPO / "tests" / "sharded_engine_check.py"), str(out),
    ]  # fmt: skip
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(out.read_text())
    assert found["local_rows"] == 48  # the embedding's 96 rows split in two: the weights really are sharded
    # The whole policy gets what `auto` gives an unsharded Llama on this CPU: the kernel where it builds.
    whole_engine = "cpu-llama" if KERNEL_MISSING else "cpu-kernel"
    assert found["sharded"]["engine"] == "hf" and found["whole"]["engine"] == whole_engine
    assert found["sharded"]["response"] == found["whole"]["response"]
    torch.testing.assert_close(
        torch.tensor(found["sharded"]["logprobs"]),
        torch.tensor(found["whole"]["logprobs"]),
        atol=1e-4,
        rtol=1e-4,
    )

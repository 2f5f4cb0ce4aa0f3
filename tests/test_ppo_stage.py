"""Stage 3 end to end on tiny models: rollout layout, learning a known reward, options, several processes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import accelerate_launch, seeded
from ppo_helpers import build_peaked_policy, liked_share, publish_tiny_pair, randomise_adapter, write_config
from safetensors.torch import load_file
from torch import Tensor

from pipeline.chat import prompt_ids, stop_token_ids, tokenize_completion
from pipeline.config import load_config
from pipeline.models import (
    LoraSettings,
    apply_lora,
    load_causal_lm,
    load_reward_model,
    read_card,
    resolve_model,
)
from stages.ppo.rollout import (
    Sequences,
    TokenValues,
    generation_weights,
    last_token_scores,
    left_pad,
    position_ids,
    response_logprobs,
    response_values,
    sample,
    truncate_at_stop,
)
from stages.ppo.train import Config, run

CPU = torch.device("cpu")
PROMPT = [{"role": "user", "content": "why do cats purr"}]


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


@pytest.fixture()
def published(store, policy_dir, tiny_tokenizer, tmp_path):
    return publish_tiny_pair(store, policy_dir, tiny_tokenizer, tmp_path)


# -- rollout layout --------------------------------------------------------------------------------


def test_sampling_draws_from_the_softmax_and_never_a_zero_probability_token():
    """The two-level inverse CDF against the probabilities it samples from, over blocks and a ragged end."""
    from stages.ppo.rollout import CDF_BLOCK, pick

    vocab = 3 * CDF_BLOCK + 7  # the last block is padding but for 7 entries
    logits = torch.full((vocab,), float("-inf"))
    support = torch.tensor([0, CDF_BLOCK - 1, CDF_BLOCK, 2 * CDF_BLOCK + 5, vocab - 1])
    logits[support] = torch.tensor([0.0, 1.0, -1.0, 2.0, 0.5])
    rows = 20_000
    tokens, logprobs = pick(logits.expand(rows, vocab), 1.0, torch.Generator().manual_seed(0))
    assert set(tokens.tolist()) <= set(support.tolist())
    expected = torch.softmax(logits[support], -1)
    observed = torch.stack([(tokens == t).float().mean() for t in support])
    assert (observed - expected).abs().max() < 4 * (expected * (1 - expected) / rows).sqrt().max()
    torch.testing.assert_close(logprobs, torch.log_softmax(logits, -1)[tokens])
    greedy, _ = pick(logits[None], 0.0, None)
    assert greedy.item() == 2 * CDF_BLOCK + 5


def test_left_padding_positions_and_truncation_at_the_stop_token():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0, device=CPU)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert position_ids(mask).tolist() == [[0, 1, 2], [0, 0, 0]]
    response = torch.tensor([[4, 2, 9, 2], [4, 4, 4, 4]])
    kept, keep, ended = truncate_at_stop(response, stop_ids=[2], pad_id=0)
    assert kept.tolist() == [[4, 2, 0, 0], [4, 4, 4, 4]]  # the stop token stays, what follows is masked
    assert keep.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]] and ended.tolist() == [True, False]


def test_generation_weights_sample_like_the_adapter_and_leave_the_model_as_it_was(
    store, policy_dir, tiny_tokenizer
):
    model = apply_lora(load_causal_lm(resolve_model(str(policy_dir), store), store), LoraSettings(r=4)).eval()
    randomise_adapter(model, seed=0)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    modules = [(name, type(m)) for name, m in model.named_modules()]
    prompts = [
        prompt_ids(tiny_tokenizer, PROMPT),
        prompt_ids(tiny_tokenizer, [{"role": "user", "content": "hi"}]),
    ]
    query, mask = left_pad(prompts, tiny_tokenizer.pad_token_id, CPU)
    settings = dict(
        max_new_tokens=8,
        temperature=0.0,
        stop_ids=stop_token_ids(tiny_tokenizer),
        pad_id=tiny_tokenizer.pad_token_id,
    )
    with generation_weights(model) as decoder:
        merged = sample(decoder, query, mask, generator=None, **settings)
    plain = sample(model, query, mask, generator=None, **settings)
    assert torch.equal(merged.response, plain.response)
    assert all(torch.equal(before[name], p) for name, p in model.named_parameters())
    assert [(name, type(m)) for name, m in model.named_modules()] == modules
    # Batched, left-padded sampling agrees with each prompt alone.
    alone = sample(
        model, query[1:, -len(prompts[1]) :], mask[1:, -len(prompts[1]) :], generator=None, **settings
    )
    assert torch.equal(alone.response[0], plain.response[1, : alone.response.shape[1]])
    # The rollout log-probs from the sampling loop (merged weights, KV cache) are those a full forward
    # pass through the adapter gives, up to float rounding; padding does not change them.
    logprobs = response_logprobs(model, plain, 1.0)
    torch.testing.assert_close(merged.logprobs, logprobs * merged.response_mask, atol=1e-4, rtol=0)
    single = response_logprobs(model, alone, 1.0)
    torch.testing.assert_close(single[0], logprobs[1, : single.shape[1]], atol=1e-5, rtol=0)


def lora_model_with_trained_adapter(model_dir, store):
    model = apply_lora(load_causal_lm(resolve_model(str(model_dir), store), store), LoraSettings(r=4)).eval()
    randomise_adapter(model, seed=0)
    return model


def decode_logits(decoder, query, mask, tokens: Tensor) -> Tensor:
    """Logits after the prompt and after each of `tokens` [B, S], fed in turn: [B, S + 1, V]."""
    logits = [decoder.prefill(query, mask, tokens.shape[1])]
    logits += [decoder.step(tokens[:, i]) for i in range(tokens.shape[1])]
    return torch.stack(logits, dim=1)


def panel_kernel_or_skip() -> None:
    from stages.ppo.panel_linear import panel_kernel

    if not panel_kernel():
        pytest.skip("the panel kernel needs an AVX-512 CPU and a C++ compiler")


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
    from stages.ppo.panel_linear import LowRank, PanelLinear

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


def test_a_kernel_that_does_not_build_falls_back_with_a_warning(monkeypatch):
    import torch.utils.cpp_extension

    from stages.ppo import panel_linear

    def no_compiler(**kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    with pytest.warns(UserWarning, match="no C\\+\\+ compiler.*oneDNN"):
        assert panel_linear.panel_kernel.__wrapped__() is False


@pytest.mark.parametrize("kernel", ["panel", "onednn"])
@pytest.mark.parametrize("adapter", ["merged", "disabled"])
def test_llama_decoder_gives_the_transformers_logits(
    store, tiny_model_dir, tiny_tokenizer, adapter, kernel, monkeypatch
):
    """Our written-out Llama step (fused, packed, preallocated cache) against the model's own forward."""
    from stages.ppo import decode
    from stages.ppo.decode import LlamaDecoder, TransformersDecoder
    from stages.ppo.panel_linear import PanelLinear

    if kernel == "panel":
        panel_kernel_or_skip()
    else:
        monkeypatch.setattr(decode, "panel_kernel", lambda: False)
    model = lora_model_with_trained_adapter(tiny_model_dir, store)
    prompts = [prompt_ids(tiny_tokenizer, PROMPT), [5, 9, 11]]  # left padding on the second row
    query, mask = left_pad(prompts, tiny_tokenizer.pad_token_id, CPU)
    tokens = torch.randint(3, len(tiny_tokenizer), (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        decoder = LlamaDecoder(model.get_base_model())
        assert isinstance(decoder.blocks[0].qkv, PanelLinear) == (kernel == "panel")
        assert decoder.whole_layers == (kernel == "panel")  # each step's layers one decode_layer call each
        if adapter == "disabled":  # the frozen reference: the same trunk without its adapter
            with model.disable_adapter():
                ours = decode_logits(LlamaDecoder(model.get_base_model()), query, mask, tokens)
                theirs = decode_logits(TransformersDecoder(model), query, mask, tokens)
        else:
            ours = decode_logits(decoder, query, mask, tokens)
            theirs = decode_logits(TransformersDecoder(model), query, mask, tokens)
            with model.disable_adapter():
                without = decode_logits(TransformersDecoder(model), query, mask, tokens)
            assert (ours - without).abs().max() > 1e-2  # the adapter changes the logits: it was merged in
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_the_next_rollout_lays_the_new_weights_out_in_the_last_ones_panels(
    store, tiny_model_dir, tiny_tokenizer
):
    from stages.ppo.decode import TransformersDecoder

    panel_kernel_or_skip()
    model = lora_model_with_trained_adapter(tiny_model_dir, store)
    query, mask = left_pad([prompt_ids(tiny_tokenizer, PROMPT), [5, 9, 11]], tiny_tokenizer.pad_token_id, CPU)
    tokens = torch.randint(3, len(tiny_tokenizer), (2, 4), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with generation_weights(model) as first:
            before = decode_logits(first, query, mask, tokens)
            panels = {id(t) for t in first.panel_tensors()}
        for name, param in model.named_parameters():  # a PPO update in between
            if "lora_B" in name:
                param.add_(0.2)
        with generation_weights(model) as second:
            assert {id(t) for t in second.panel_tensors()} == panels
            after = decode_logits(second, query, mask, tokens)
        expected = decode_logits(TransformersDecoder(model), query, mask, tokens)
    assert (after - before).abs().max() > 1e-2
    torch.testing.assert_close(after, expected, atol=1e-4, rtol=1e-4)


def test_generation_weights_on_other_architectures_decode_through_the_model(tmp_path, tiny_tokenizer):
    """A model that is not a Llama (here Qwen2, with q/k/v biases) takes the generic path and agrees."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from stages.ppo.decode import TransformersDecoder

    config = Qwen2Config(
        vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, pad_token_id=tiny_tokenizer.pad_token_id,
    )  # fmt: skip
    with seeded(0):
        model = apply_lora(Qwen2ForCausalLM(config), LoraSettings(r=4)).eval()
    randomise_adapter(model, seed=0)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    query, mask = left_pad([prompt_ids(tiny_tokenizer, PROMPT), [5, 9]], tiny_tokenizer.pad_token_id, CPU)
    settings = dict(max_new_tokens=6, temperature=0.0, stop_ids=[], pad_id=tiny_tokenizer.pad_token_id)
    with generation_weights(model) as decoder:
        assert isinstance(decoder, TransformersDecoder)
        merged = sample(decoder, query, mask, generator=None, **settings)
    plain = sample(model, query, mask, generator=None, **settings)
    assert torch.equal(merged.response, plain.response)
    torch.testing.assert_close(merged.logprobs, plain.logprobs, atol=1e-4, rtol=0)
    assert all(torch.equal(before[name], p) for name, p in model.named_parameters())


def test_critic_on_the_top_layers_shares_the_lower_ones_with_the_reward_model(
    store, tiny_model_dir, tiny_tokenizer
):
    """Values and scores computed from the shared layers' output equal full passes, before and after
    Experience.select trims padding columns; only the top layer's adapter and the head get gradients."""
    from pipeline.models import load_reward_model
    from stages.ppo.train import Experience

    rm = load_reward_model(resolve_model(str(tiny_model_dir), store), store)
    critic = TokenValues(apply_lora(rm, LoraSettings(r=4), "SEQ_CLS", layers=[1]), 0.5, 2.0, shared_layers=1)
    randomise_adapter(critic, seed=0)
    assert not any("layers.0." in name and "lora_" in name for name, _ in critic.named_parameters())
    prompts = [prompt_ids(tiny_tokenizer, PROMPT), [5, 9, 11], [7, 8]]
    query, query_mask = left_pad(prompts, tiny_tokenizer.pad_token_id, CPU)
    response = torch.randint(3, len(tiny_tokenizer), (3, 5), generator=torch.Generator().manual_seed(1))
    response_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.float)
    seq = Sequences(
        query, query_mask, response, response_mask, torch.ones(3, dtype=torch.bool), torch.zeros(3, 5)
    )
    with torch.no_grad():
        lower = critic.lower(seq.input_ids, seq.attention_mask)
        real = seq.attention_mask.bool()
        full = critic(seq.input_ids, seq.attention_mask)
        torch.testing.assert_close(critic(seq.input_ids, seq.attention_mask, lower=lower)[real], full[real])
        with critic.classifier.disable_adapter():  # the reward model itself, from the same shared output
            reward = critic(seq.input_ids, seq.attention_mask)
            torch.testing.assert_close(
                critic(seq.input_ids, seq.attention_mask, lower=lower)[real], reward[real]
            )
        assert (reward - full)[real].abs().max() > 1e-3  # the top layer's adapter is live

    # Rows 0 and 2 only: the long prompt's padding columns and the response columns nobody uses are cut.
    zeros = torch.zeros(3, 5)
    exp = Experience(seq, zeros, zeros, torch.zeros(3), zeros, zeros, zeros, None, lower)
    part = exp.select(torch.tensor([2, 1]))
    assert part.seq.input_ids.shape[1] < seq.input_ids.shape[1]
    values = response_values(critic, part.seq, part.critic_lower)
    expected = response_values(critic, part.seq)
    torch.testing.assert_close(values * part.seq.response_mask, expected * part.seq.response_mask)
    (values * part.seq.response_mask).sum().backward()
    trained = {name for name, p in critic.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert trained and all("layers.1." in name or "score" in name for name in trained), trained


def test_policy_on_the_top_layers_shares_the_lower_ones_with_the_reference(
    store, tiny_model_dir, tiny_tokenizer
):
    from stages.ppo.rollout import lower_layers, response_logits

    model = apply_lora(
        load_causal_lm(resolve_model(str(tiny_model_dir), store), store), LoraSettings(r=4), layers=[1]
    )
    randomise_adapter(model, seed=0)
    query, query_mask = left_pad(
        [prompt_ids(tiny_tokenizer, PROMPT), [5, 9]], tiny_tokenizer.pad_token_id, CPU
    )
    response = torch.randint(3, len(tiny_tokenizer), (2, 4), generator=torch.Generator().manual_seed(1))
    seq = Sequences(
        query, query_mask, response, torch.ones(2, 4), torch.ones(2, dtype=torch.bool), torch.zeros(2, 4)
    )
    lower = lower_layers(model, 1, seq.input_ids, seq.attention_mask)
    torch.testing.assert_close(response_logits(model, seq, lower), response_logits(model, seq))
    with model.disable_adapter():  # the reference
        reference = response_logits(model, seq)
        torch.testing.assert_close(response_logits(model, seq, lower), reference)
    assert (reference - response_logits(model, seq)).abs().max() > 1e-3
    adapted = {
        name.split(".layers.")[1].split(".")[0] for name, _ in model.named_parameters() if "lora_" in name
    }
    assert adapted == {"1"}


def test_passes_over_packed_rollouts_equal_the_padded_ones(store, published, tiny_model_dir, tiny_tokenizer):
    from pipeline.packed_attention import use_packed_attention
    from stages.ppo import rl
    from stages.ppo.rollout import hf_model, lower_layers, packs, response_logits

    model = lora_model_with_trained_adapter(tiny_model_dir, store)
    rm = load_reward_model(resolve_model("reward:latest", store), store).eval()
    # Prompts of three lengths (left padding) and responses cut short (right padding).
    query, query_mask = left_pad(
        [prompt_ids(tiny_tokenizer, PROMPT), [5, 9], [7]], tiny_tokenizer.pad_token_id, CPU
    )
    response = torch.randint(3, len(tiny_tokenizer), (3, 5), generator=torch.Generator().manual_seed(2))
    response_mask = torch.tensor([[1.0] * 5, [1.0, 1.0, 0.0, 0.0, 0.0], [1.0] * 4 + [0.0]])
    seq = Sequences(
        query, query_mask, response, response_mask, torch.ones(3, dtype=torch.bool), torch.zeros(3, 5)
    )

    def passes() -> dict[str, Tensor]:
        logits = response_logits(model, seq)
        logprobs, _ = rl.logprobs_and_entropy(logits, response)
        model.zero_grad()
        (logprobs * response_mask).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        with torch.no_grad():
            lower = lower_layers(model, 1, seq.input_ids, seq.attention_mask)
            values = TokenValues(rm)(seq.input_ids, seq.attention_mask)
            out = {
                "logits": logits.detach(),
                "from_lower": response_logits(model, seq, lower),
                "values": values,
            }
        return out | {"scores": last_token_scores(TokenValues(rm), seq)} | grads

    assert not packs(model)
    padded = passes()
    use_packed_attention(hf_model(model))
    use_packed_attention(rm)
    assert packs(model) and packs(rm)
    packed = passes()
    real, response_real = seq.attention_mask.bool(), response_mask.bool()
    for key in ("logits", "from_lower"):
        torch.testing.assert_close(packed[key][response_real], padded[key][response_real])
    torch.testing.assert_close(packed["values"][real], padded["values"][real])
    torch.testing.assert_close(packed["scores"], padded["scores"])
    assert packed.keys() == padded.keys()
    grads = [key for key in padded if "lora_" in key]
    assert grads
    for key in grads:
        # The two attention kernels add in different orders: float32 rounding, relative to the largest entry.
        scale = float(padded[key].abs().max())
        torch.testing.assert_close(
            packed[key], padded[key], rtol=1e-4, atol=1e-5 * scale, msg=lambda m, key=key: f"{key}: {m}"
        )


def test_reward_scores_match_the_reward_model_on_its_training_layout(store, published, tiny_tokenizer):
    # The RM was trained on tokenize_completion(prompt, completion): prompt ids + reply up to its end of turn.
    rm = load_reward_model(resolve_model("reward:latest", store), store).eval()
    examples = [("Paris is the capital of France.", PROMPT), ("Sure!", [{"role": "user", "content": "hi"}])]
    rows = [tokenize_completion(tiny_tokenizer, prompt, text) for text, prompt in examples]
    query, query_mask = left_pad(
        [r.input_ids[: r.prompt_length] for r in rows], tiny_tokenizer.pad_token_id, CPU
    )
    width = max(len(r.input_ids) - r.prompt_length for r in rows) + 2
    response = torch.full((2, width), tiny_tokenizer.pad_token_id)
    for i, r in enumerate(rows):
        reply = r.input_ids[r.prompt_length :]
        response[i, : len(reply)] = torch.tensor(reply)
    response, response_mask, ended = truncate_at_stop(
        response, stop_token_ids(tiny_tokenizer), tiny_tokenizer.pad_token_id
    )
    assert ended.all()
    seq = Sequences(query, query_mask, response, response_mask, ended, torch.zeros(response.shape))
    ours = last_token_scores(TokenValues(rm), seq)
    with torch.no_grad():
        theirs = [rm(input_ids=torch.tensor([r.input_ids])).logits[0, 0] for r in rows]
    torch.testing.assert_close(ours, torch.stack(theirs), atol=1e-5, rtol=0)


# -- training --------------------------------------------------------------------------------------


def test_ppo_raises_the_reward_on_held_out_prompts_with_bounded_kl(
    store, published, tmp_path, tiny_tokenizer
):
    sft_id, reward_id = published
    cfg = load_config(Config, write_config(tmp_path / "ppo.yaml", store), [])
    artifact = run(cfg, store)

    metrics = artifact.metrics
    assert artifact.stage == "ppo"
    assert metrics["eval_score_final"] > metrics["eval_score_initial"] + 0.25, metrics
    assert metrics["eval_win_rate_final"] > 0.6, metrics
    assert 0 < metrics["eval_kl_final"] < 15, metrics
    roles = {item["role"]: item.get("artifact") for item in artifact.manifest["inputs"]}
    assert roles["policy"] == sft_id and roles["reward"] == reward_id

    folder = Path(artifact.uri)
    history = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == list(range(cfg.steps + 1))
    assert all(h["approx_kl"] < 0.1 for h in history[1:])  # a healthy update size
    samples = [json.loads(line) for line in (folder / "samples.jsonl").read_text().splitlines()]
    assert samples and {"step", "prompt", "response", "score"} <= samples[0].keys()

    # The artifact loads as a policy (SFT + merged adapter) that prefers the liked tokens more than SFT does.
    policy = load_causal_lm(resolve_model(artifact.id, store), store).eval()
    sft = load_causal_lm(resolve_model(sft_id, store), store).eval()
    query, mask = left_pad([prompt_ids(tiny_tokenizer, PROMPT)] * 16, tiny_tokenizer.pad_token_id, CPU)
    shares = []
    for model in (sft, policy):
        seq = sample(
            model, query, mask, max_new_tokens=12, temperature=1.0, stop_ids=stop_token_ids(tiny_tokenizer),
            pad_id=tiny_tokenizer.pad_token_id, generator=torch.Generator().manual_seed(0),
        )  # fmt: skip
        shares.append(liked_share(tiny_tokenizer, seq.response[seq.response_mask.bool()].tolist()))
    assert shares[1] > shares[0] + 0.05, shares
    value = load_reward_model(resolve_model(str(folder / "value"), store), store)
    assert value.config.num_labels == 1


def test_full_finetuning_with_ptx_adaptive_kl_and_policy_value_init(store, published, tmp_path):
    overrides = [
        "--steps", "2", "--lora.enabled", "false", "--value_init", "policy", "--ptx_coef", "0.5",
        "--kl_target", "1.0", "--kl_horizon", "100", "--kl_estimator", "k3", "--missing_eos_penalty", "1.0",
        "--eval_limit", "4", "--learning_rate", "1e-4", "--report_to", "tensorboard",
    ]  # fmt: skip
    cfg = load_config(Config, write_config(tmp_path / "ppo.yaml", store), overrides)
    artifact = run(cfg, store)
    history = [json.loads(line) for line in (Path(artifact.uri) / "metrics.jsonl").read_text().splitlines()]
    assert history[-1]["ptx_loss"] > 0
    assert history[-1]["beta"] != cfg.kl_coef  # the controller moved beta
    assert any((Path(cfg.output_dir) / cfg.run_name / "tensorboard").iterdir())
    assert (Path(artifact.uri) / "model.safetensors").is_file()  # full weights, no adapter
    load_causal_lm(resolve_model(artifact.id, store), store)


def test_value_head_on_the_reward_trunk(store, published, tmp_path):
    _, reward_id = published
    overrides = ["--steps", "3", "--critic", "head", "--eval_prompts", "null"]
    cfg = load_config(Config, write_config(tmp_path / "ppo.yaml", store), overrides)
    folder = Path(run(cfg, store).uri) / "value"
    card = read_card(folder)
    assert card["kind"] == "value_head" and card["trunk"] == reward_id
    head = load_file(str(folder / "value_head.safetensors"))["weight"]
    rm = load_reward_model(resolve_model(reward_id, store), store)
    assert head.shape == rm.score.weight.shape and not torch.equal(
        head, rm.score.weight
    )  # trained from the RM's


def test_two_processes_publish_exactly_one_artifact(store, published, tmp_path):
    config = write_config(
        tmp_path / "ppo.yaml", store, steps=2, eval_limit=6, checkpoint_every=1, keep_checkpoints=1,
        policy_layers=1, critic_layers=1,  # the shared bottom layers under DDP
    )  # fmt: skip
    result = accelerate_launch(["ppo", "--config", str(config)], processes=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(store.list("ppo")) == 1
    checkpoints = sorted(p.name for p in (tmp_path / "runs" / "ppo-tiny-test").glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-000002"]
    assert {p.name for p in (tmp_path / "runs" / "ppo-tiny-test" / checkpoints[0]).glob("rng-*")} == {
        "rng-0.pt",
        "rng-1.pt",
    }

"""Stage 3 on tiny models: the shared-layer passes, learning a known reward, options, several processes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import DEMO_DATA
from ppo_helpers import build_peaked_policy, liked_share, publish_tiny_pair, randomise_adapter, write_config
from safetensors.torch import load_file
from torch import Tensor

from pipeline.chat import prompt_ids, stop_token_ids, tokenize_completion
from pipeline.config import load_config
from pipeline.generation import SamplingSettings, Sequences, left_pad, make_engine
from pipeline.generation.sampling import truncate_at_stop
from pipeline.models import (
    LoraSettings,
    ModelError,
    apply_lora,
    load_causal_lm,
    load_reward_model,
    read_card,
    resolve_model,
)
from pipeline.packed_attention import use_packed_attention
from stages.ppo import rl
from stages.ppo.critic import TrunkCritic, Units
from stages.ppo.passes import Shared, packs, response_slice
from stages.ppo.policy import Policy
from stages.ppo.train import Config, Rollouts, health_problem, run

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


def rollouts_of(
    tiny_tokenizer, prompts: list[list[int]], responses: Tensor, response_mask: Tensor
) -> Sequences:
    """A batch of finished rollouts with left-padded prompts and responses cut short (right padding)."""
    query, query_mask = left_pad(prompts, tiny_tokenizer.pad_token_id, CPU)
    rows = len(prompts)
    return Sequences(query, query_mask, responses, response_mask, torch.ones(rows, dtype=torch.bool),
                     torch.zeros(responses.shape))  # fmt: skip


def adapted(model, layers=None):
    model = apply_lora(
        model, LoraSettings(r=4), "SEQ_CLS" if "ForSequence" in type(model).__name__ else "CAUSAL_LM", layers
    )
    randomise_adapter(model, seed=0)
    return model


# -- the passes over rollouts ------------------------------------------------------------------------


def test_policy_on_the_top_layers_shares_the_lower_ones_with_the_reference(
    store, tiny_model_dir, tiny_tokenizer
):
    """Logits from the shared bottom layers' output equal full passes, for the policy and the reference,
    before and after a mini-batch's rows are selected; only the top layer's adapter gets gradients."""
    lm = adapted(load_causal_lm(resolve_model(str(tiny_model_dir), store), store), layers=[1])
    policy = Policy(lm, reference=None, shared_layers=1)
    responses = torch.randint(3, len(tiny_tokenizer), (3, 4), generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[1.0] * 4, [1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0]])
    seq = rollouts_of(tiny_tokenizer, [prompt_ids(tiny_tokenizer, PROMPT), [5, 9], [7]], responses, mask)
    shared = policy.prepare(seq)
    assert shared.hidden is not None and shared.hidden.shape[:2] == seq.input_ids.shape
    kept = mask.bool()
    full = policy.current_logits(seq, Shared())
    torch.testing.assert_close(policy.logits(seq, shared)[kept], full[kept])
    torch.testing.assert_close(policy.current_logits(seq, shared)[kept], full[kept])  # the evaluation's pass
    reference = policy.reference_logits(seq, shared)
    torch.testing.assert_close(reference[kept], policy.reference_logits(seq, Shared())[kept])
    assert (reference - full)[kept].abs().max() > 1e-3  # the top layer's adapter is live
    zeros = torch.zeros(3, 4)
    rollouts = Rollouts(seq, shared, Shared(), zeros, zeros, torch.zeros(3), zeros, zeros, zeros)
    part = rollouts.select(torch.tensor([2, 1]))
    assert part.seq.input_ids.shape[1] < seq.input_ids.shape[1]  # padding columns nobody uses are cut
    logits = policy.logits(part.seq, part.policy_shared)
    part_kept = part.seq.response_mask.bool()
    torch.testing.assert_close(logits[part_kept], policy.current_logits(part.seq, Shared())[part_kept])
    logprobs, _ = rl.logprobs_and_entropy(logits, part.seq.response)
    (logprobs * part.seq.response_mask).sum().backward()
    grads = {name for name, p in lm.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads and all("layers.1." in name for name in grads), grads


def test_critic_on_the_top_layers_shares_the_lower_ones_with_the_reward_model(
    store, tiny_model_dir, tiny_tokenizer
):
    """Values and scores computed from the shared layers' output equal full passes; the reward model is
    the critic's trunk with its adapter off; only the top layer's adapter and the head get gradients."""
    rm = adapted(load_reward_model(resolve_model(str(tiny_model_dir), store), store), layers=[1])
    units = Units(0.5, 2.0)
    critic = TrunkCritic(rm, None, shared_layers=1, value_units=units, reward_units=units)
    full = TrunkCritic(rm, None, shared_layers=0, value_units=units, reward_units=units)
    responses = torch.randint(3, len(tiny_tokenizer), (3, 5), generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.float)
    seq = rollouts_of(
        tiny_tokenizer, [prompt_ids(tiny_tokenizer, PROMPT), [5, 9, 11], [7, 8]], responses, mask
    )
    shared = critic.prepare(seq)
    kept = mask.bool()
    with torch.no_grad():
        torch.testing.assert_close(critic.values(seq, shared)[kept], full.values(seq, Shared())[kept])
        scores = critic.scores(seq, shared)
        torch.testing.assert_close(scores, full.scores(seq, Shared()))
        with rm.disable_adapter():
            without = full.values(seq, Shared())
        assert (without - full.values(seq, Shared()))[kept].abs().max() > 1e-3  # the adapter is live
    values = critic.values(seq, shared)
    (values * mask).sum().backward()
    trained = {name for name, p in rm.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert trained and all("layers.1." in name or "score" in name for name in trained), trained


def test_passes_over_packed_rollouts_equal_the_padded_ones(store, published, tiny_model_dir, tiny_tokenizer):
    """The policy's logits and gradients, the values and the scores are the same whether the real tokens
    are packed into one row or the batch runs padded."""
    lm = adapted(load_causal_lm(resolve_model(str(tiny_model_dir), store), store))
    rm = load_reward_model(resolve_model("reward:latest", store), store).eval()
    policy = Policy(lm, reference=None, shared_layers=0)
    critic = TrunkCritic(rm, rm, shared_layers=0, value_units=Units(), reward_units=Units())
    responses = torch.randint(3, len(tiny_tokenizer), (3, 5), generator=torch.Generator().manual_seed(2))
    mask = torch.tensor([[1.0] * 5, [1.0, 1.0, 0.0, 0.0, 0.0], [1.0] * 4 + [0.0]])
    seq = rollouts_of(tiny_tokenizer, [prompt_ids(tiny_tokenizer, PROMPT), [5, 9], [7]], responses, mask)

    def passes() -> dict[str, Tensor]:
        logits = policy.logits(seq, Shared())
        logprobs, _ = rl.logprobs_and_entropy(logits, responses)
        lm.zero_grad()
        (logprobs * mask).sum().backward()
        grads = {n: p.grad.clone() for n, p in lm.named_parameters() if p.grad is not None}
        with torch.no_grad():
            return {"logits": logits.detach(), "values": critic.values(seq, Shared()),
                    "scores": critic.scores(seq, Shared())} | grads  # fmt: skip

    assert not packs(lm)
    padded = passes()
    use_packed_attention(lm.get_base_model())
    use_packed_attention(rm)
    assert packs(lm) and packs(rm)
    packed = passes()
    assert packed.keys() == padded.keys()
    kept = mask.bool()
    torch.testing.assert_close(packed["logits"][kept], padded["logits"][kept])
    torch.testing.assert_close(packed["values"][kept], padded["values"][kept])
    torch.testing.assert_close(packed["scores"], padded["scores"])
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
    critic = TrunkCritic(rm, rm, shared_layers=0, value_units=Units(), reward_units=Units(1.0, 2.0))
    ours = critic.scores(seq, critic.prepare(seq))
    with torch.no_grad():
        theirs = [(rm(input_ids=torch.tensor([r.input_ids])).logits[0, 0] - 1.0) / 2.0 for r in rows]
    torch.testing.assert_close(ours, torch.stack(theirs), atol=1e-5, rtol=0)
    assert response_slice(torch.zeros(2, seq.input_ids.shape[1]), seq).shape == response.shape


def test_a_step_with_a_non_finite_quantity_or_a_kl_past_its_bound_is_named():
    healthy = {"policy_loss": 0.1, "value_loss": 0.2, "score": 0.5, "kl": 3.0, "reward": 0.4}
    assert health_problem(healthy, max_kl=10.0) is None
    assert health_problem(healthy | {"value_loss": float("nan")}, max_kl=10.0) == "value_loss is nan"
    assert health_problem(healthy | {"score": float("inf")}, max_kl=None) == "score is inf"
    assert "past max_kl=2.0" in health_problem(healthy, max_kl=2.0)
    assert health_problem(healthy, max_kl=None) is None


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
    shares = []
    for model in (sft, policy):
        engine = make_engine(
            "hf", model, stop_ids=stop_token_ids(tiny_tokenizer), pad_id=tiny_tokenizer.pad_token_id
        )
        engine.sync(model)
        seq = engine.sample([prompt_ids(tiny_tokenizer, PROMPT)] * 16, SamplingSettings(max_new_tokens=12),
                            torch.Generator().manual_seed(0))  # fmt: skip
        shares.append(liked_share(tiny_tokenizer, seq.response[seq.response_mask.bool()].tolist()))
    assert shares[1] > shares[0] + 0.05, shares
    assert artifact.manifest["meta"]["rollout_engine"] in ("cpu-llama", "cpu-kernel")  # auto on a CPU
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
    assert list((Path(cfg.output_dir) / cfg.run_name).glob("events.out.tfevents.*"))
    assert (Path(artifact.uri) / "model.safetensors").is_file()  # full weights, no adapter
    load_causal_lm(resolve_model(artifact.id, store), store)


def test_value_head_on_the_reward_trunk(store, published, tmp_path):
    _, reward_id = published
    overrides = ["--steps", "3", "--critic", "head", "--eval_prompts", "null"]
    cfg = load_config(Config, write_config(tmp_path / "ppo.yaml", store), overrides)
    artifact = run(cfg, store)
    folder = Path(artifact.uri) / "value"
    card = read_card(folder)
    assert card["kind"] == "value_head" and card["trunk"] == reward_id
    head = load_file(str(folder / "value_head.safetensors"))["weight"]
    rm = load_reward_model(resolve_model(reward_id, store), store)
    assert head.shape == rm.score.weight.shape and not torch.equal(
        head, rm.score.weight
    )  # trained from the RM's


def test_leave_one_out_advantages_raise_the_reward_with_no_value_model(store, published, tmp_path):
    # Four replies to each of four prompts a step; each reply's baseline is the other three's return.
    overrides = ["--advantage", "rloo", "--samples_per_prompt", "4", "--steps", "12", "--eval_limit", "16",
                 "--num_samples", "4"]  # fmt: skip
    cfg = load_config(Config, write_config(tmp_path / "ppo.yaml", store), overrides)
    artifact = run(cfg, store)
    metrics = artifact.metrics
    assert metrics["eval_score_final"] > metrics["eval_score_initial"] + 0.25, metrics
    folder = Path(artifact.uri)
    assert not (folder / "value").exists() and artifact.manifest["meta"]["value_model"] is False
    assert "value model trained with it" not in (folder / "README.md").read_text()
    history = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert all("value_loss" not in h for h in history[1:]) and math.isfinite(history[-1]["policy_loss"])
    # The logged samples are the first four replies of a step: one prompt's group, four different replies.
    samples = [json.loads(line) for line in (folder / "samples.jsonl").read_text().splitlines()]
    for step in {s["step"] for s in samples}:
        group = [s for s in samples if s["step"] == step]
        assert len({json.dumps(s["prompt"]) for s in group}) == 1, group  # one prompt a group
        assert len({s["response"] for s in group}) > 1, group  # with replies that differ


def test_a_length_trend_needs_replies_that_finish(store, published, tmp_path):
    # The tiny policy never samples its stop token in 12 tokens: nothing to fit a length trend on, so the run
    # is refused before its first step, naming the fix, and publishes nothing.
    overrides = [
        "--steps",
        "1",
        "--eval_prompts",
        "null",
        "--length_correction",
        "linear",
        "--length_calibration",
        "8",
    ]
    cfg = load_config(Config, write_config(tmp_path / "ppo.yaml", store), overrides)
    with pytest.raises(ValueError, match="only 0 of the 8 calibration replies ended .* raise max_new_tokens"):
        run(cfg, store)
    assert store.list("ppo") == []


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["--lora.enabled", "false", "--policy_layers", "1"], "policy_layers .* needs LoRA"),
        (["--critic", "head", "--critic_layers", "1"], "critic_layers .* set critic_layers: 0"),
        (["--value_init", "policy", "--critic_layers", "1"], "critic_layers .* set critic_layers: 0"),
        (["--policy_layers", "2"], "policy_layers must be below the model's 2 layers"),
    ],
)
def test_layer_sharing_that_cannot_apply_is_refused(store, published, tmp_path, overrides, message):
    cfg = load_config(Config, write_config(tmp_path / "ppo.yaml", store), ["--steps", "1", *overrides])
    with pytest.raises(ModelError, match=message):
        run(cfg, store)
    assert store.list("ppo") == []


def test_a_diverging_run_stops_with_its_state_saved_and_publishes_nothing(store, published, tmp_path):
    # The first step's KL is 0 (the adapter starts as the identity); the second's is tiny but positive.
    overrides = ["--steps", "3", "--max_kl", "1e-9", "--eval_prompts", "null"]
    cfg = load_config(Config, write_config(tmp_path / "ppo.yaml", store), overrides)
    with pytest.raises(
        ValueError, match=r"step 2: the KL to SFT reached .* past max_kl=1e-09.*inspect-000002"
    ):
        run(cfg, store)
    assert store.list("ppo") == []
    assert (Path(cfg.output_dir) / cfg.run_name / "inspect-000002" / "policy.safetensors").is_file()


def test_evaluation_reports_each_prompt_set_and_a_second_opinion(store, published, tmp_path, tiny_tokenizer):
    """Two named prompt sets (one in FastChat's question format), two replies per prompt, and a judge:
    each set's metrics, the judge's win rate and its gap to the proxy's, and the replies side by side, with
    the judge's scores what `rlhf reward score` gives for the same text."""
    from pipeline.scoring import load_reward

    sft_id, reward_id = published
    questions = tmp_path / "question.jsonl"
    questions.write_text("".join(
        json.dumps({"question_id": i, "category": "writing", "turns": [text, "And again?"]}) + "\n"
        for i, text in enumerate(["Write a haiku about tea.", "Explain rain to a child.", "Name three birds."])
    ))  # fmt: skip
    sets = {"demo": str(DEMO_DATA / "eval_prompts.jsonl"), "mtb": str(questions)}
    config = write_config(tmp_path / "ppo.yaml", store, steps=2, eval_every=0, eval_limit=4, eval_samples=2,
                          eval_prompts=sets, eval_judge=reward_id, eval_max_new_tokens=6)  # fmt: skip
    artifact = run(load_config(Config, config, []), store)
    history = [json.loads(line) for line in (Path(artifact.uri) / "metrics.jsonl").read_text().splitlines()]
    final = history[-1]
    for name in ("demo", "mtb"):
        for key in ("score", "kl", "length", "words", "win", "win_ci", "judge_score", "judge_win", "win_gap"):
            assert math.isfinite(final[f"eval/{name}/{key}"]), (name, key)
        # the tiny model almost never samples a stop token: replies run into the 6-token limit, as counted
        assert final[f"eval/{name}/length"] == 6 and final[f"eval/{name}/no_stop"] == 1.0, name
        assert final[f"eval/{name}/win_gap"] == pytest.approx(
            final[f"eval/{name}/win"] - final[f"eval/{name}/judge_win"]
        )
    assert artifact.metrics["eval_mtb_judge_win_rate_final"] == pytest.approx(
        final["eval/mtb/judge_win"], abs=1e-6
    )
    pairs = [json.loads(line) for line in (Path(artifact.uri) / "eval_pairs.jsonl").read_text().splitlines()]
    assert {p["set"] for p in pairs} == {"demo", "mtb"} and len(pairs) == 4 + 3
    judge = load_reward(reward_id, store)
    for pair in pairs[:3]:
        for side in ("policy", "sft"):
            (raw,) = judge.score(pair["prompt"], [pair[side]["text"]])
            assert pair[side]["judge"] == pytest.approx(judge.normalise(raw), abs=1e-4)
    roles = {item["role"] for item in artifact.manifest["inputs"]}
    assert {"judge", "eval_prompts:demo", "eval_prompts:mtb"} <= roles


def test_an_evaluation_row_counts_a_reply_cut_at_the_limit_as_not_stopped():
    from stages.ppo.evaluate import Reply, compared

    finished = Reply("Tea, then rain.", proxy=0.4, judge=None, kl=1.5, length=5, ended=True)
    cut = Reply("Tea is a drink that people", proxy=0.9, judge=None, kl=0.0, length=6, ended=False)
    assert compared(3, finished, cut, judged=False) == {
        "prompt": 3, "score": 0.4, "kl": 1.5, "length": 5, "words": 3, "no_stop": 0.0, "win": 0.0
    }  # fmt: skip
    assert compared(3, cut, finished, judged=False)["no_stop"] == 1.0


def test_step_zero_is_scored_from_the_sft_replies_as_a_second_generation_would_score_it(
    store, published, tmp_path, monkeypatch
):
    """Before its first update the policy samples what the SFT policy samples (same weights, same seeds),
    so step 0 reuses the SFT replies: the metrics equal those of generating the policy's replies again."""
    from stages.ppo.evaluate import Evaluation

    sft_id, reward_id = published
    seen = {}
    baseline = Evaluation.baseline

    def both(self, policy, critic):
        seen["baseline"] = baseline(self, policy, critic)
        seen["generated"] = self.run(policy, critic)
        return seen["baseline"]

    monkeypatch.setattr(Evaluation, "baseline", both)
    config = write_config(tmp_path / "ppo.yaml", store, steps=1, eval_every=0, eval_limit=4, eval_samples=2,
                          eval_judge=reward_id, eval_max_new_tokens=6)  # fmt: skip
    run(load_config(Config, config, []), store)
    generated = seen["generated"]
    assert set(seen["baseline"]) == set(generated)
    for key, value in seen["baseline"].items():
        assert value == pytest.approx(generated[key], rel=1e-4, abs=1e-4), key
    assert generated["eval/win"] == 0.5 and generated["eval/kl"] == pytest.approx(0.0, abs=1e-4)


def test_the_report_shows_curves_a_verdict_and_replies_side_by_side():
    from stages.ppo.report import render

    history = [
        {
            "step": 0,
            "eval/mtb/win": 0.5,
            "eval/mtb/judge_win": 0.5,
            "eval/mtb/score": 0.1,
            "eval/mtb/kl": 0.0,
        },
        {"step": 1, "score": 0.3, "kl": 0.1},
        {
            "step": 2,
            "eval/mtb/win": 0.8,
            "eval/mtb/judge_win": 0.4,
            "eval/mtb/score": 0.9,
            "eval/mtb/kl": 2.5,
        },
    ]
    pairs = [{"set": "mtb", "prompt": [{"role": "user", "content": "Name three birds."}],
              "policy": {"text": "Robin, wren, owl.", "proxy": 1.25, "judge": -0.5},
              "sft": {"text": "Birds are animals with feathers.", "proxy": 0.5, "judge": 0.25}}]  # fmt: skip
    text = render(history, pairs, pairs_per_set=3, width=80)
    lines = text.splitlines()
    assert lines[0] == "== mtb ==" and "proxy win" in lines[1] and "judge win" in lines[1]
    # Columns: step, proxy win, judge win, score, KL (no gap: these rows do not carry one).
    assert lines[2].split() == ["0", "0.500", "0.500", "0.100", "0.000"]
    assert lines[3].split() == ["2", "0.800", "0.400", "0.900", "2.500"]
    assert "over-optimised" in text  # the proxy rose, the judge fell
    assert any("Robin, wren, owl." in line and "Birds are animals" in line for line in lines)
    assert any("PPO  proxy +1.25  judge -0.50" in line for line in lines)
    assert render([{"step": 1, "score": 0.1}], [], pairs_per_set=1, width=80).startswith("no evaluation")


def test_prompts_from_a_labels_artifact_are_read_and_named_in_the_lineage(store, published, tmp_path):
    payload = tmp_path / "labels"
    payload.mkdir()
    (payload / "prompts.jsonl").write_text((DEMO_DATA / "prompts.jsonl").read_text())
    labels = store.publish("labels", payload, config={}, meta={})
    overrides = [
        "--steps",
        "1",
        "--prompts",
        "labels:latest",
        "--eval_prompts",
        "labels:latest",
        "--eval_limit",
        "2",
    ]
    artifact = run(load_config(Config, write_config(tmp_path / "ppo.yaml", store), overrides), store)
    roles = {item["role"]: item for item in artifact.manifest["inputs"]}
    assert roles["prompts"]["artifact"] == labels.id and roles["prompts"]["file"] == "prompts.jsonl"
    assert roles["eval_prompts"]["artifact"] == labels.id

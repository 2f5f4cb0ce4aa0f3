"""Stage 3: PPO against the reward model, with a per-token KL penalty to the SFT policy (InstructGPT).

`run` reads top to bottom. Each step:

1. rollout: a batch of prompts (data.py, each process its shard), responses sampled by the rollout
   engine (pipeline.generation) from the policy's weights as of the last update;
2. score: the reference log-probs (policy.py), the values and the reward model's scores (critic.py);
3. advantages: KL-shaped per-token rewards and GAE (rl.py, the maths as pure functions), or with
   `advantage: rloo` no value model: each reply's return against its prompt's other replies;
4. update: `ppo_epochs` passes of clipped policy and value losses over mini-batches (with PPO-ptx's
   language-model loss when ptx_coef is set: ptx.py), then the engine takes the new weights;
5. log, evaluate now and then (evaluate.py), and checkpoint (checkpoint.py: resume is exact).

A step whose loss, reward or KL is not finite, or whose KL passes `max_kl`, stops the run with one line
after saving the state to inspect; nothing is published from a broken policy. At the end the policy,
the value model, the metric history and sample completions are published as a `ppo` artifact.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase, get_scheduler, set_seed

from pipeline.chat import stop_token_ids
from pipeline.checkpoints import start_or_resume
from pipeline.config import to_dict
from pipeline.generation import SamplingSettings, Sequences, make_engine
from pipeline.models import ModelError, load_tokenizer, resolve_model
from pipeline.store import Artifact, ArtifactStore
from pipeline.tracking import flat_config, tracker_names
from stages.ppo import checkpoint, rl
from stages.ppo.checkpoint import RunState, Trained
from stages.ppo.config import Config
from stages.ppo.critic import Critic, RewardOnly, load_critic, load_reward_only
from stages.ppo.data import load_evaluation, load_prompts, take, with_data_files
from stages.ppo.length import LengthCorrected, LengthFit, calibrate
from stages.ppo.passes import Shared
from stages.ppo.policy import Policy, load_policy_and_reference
from stages.ppo.ptx import load_demonstrations, ptx_backward
from stages.ppo.publish import log_step, publish, source_of, summarize

__all__ = ["Config", "run"]


class TrainingDiverged(ValueError):
    """A step produced a non-finite quantity or a KL past its bound; the message names which."""


def run(cfg: Config, store: ArtifactStore) -> Artifact | None:
    """Train with PPO and publish a `ppo` artifact (main process); other processes return None."""
    cfg = with_data_files(cfg, store)
    acc = Accelerator(log_with=tracker_names(cfg.report_to) or None, project_dir=cfg.output_dir)
    set_seed(cfg.seed)
    if cfg.batch_size % acc.num_processes or cfg.mini_batch_size % acc.num_processes:
        raise ValueError(
            f"batch_size and mini_batch_size must be multiples of the {acc.num_processes} processes"
        )
    if (cfg.batch_size // cfg.samples_per_prompt) % acc.num_processes:
        raise ValueError(
            f"the {cfg.batch_size // cfg.samples_per_prompt} prompts a step (batch_size / samples_per_prompt) "
            f"must be a multiple of the {acc.num_processes} processes: each process samples whole prompts"
        )
    run_dir = Path(cfg.output_dir) / cfg.run_name
    # A resume whose settings would alter the run is refused here, naming the key (--force accepts it).
    resume_from = start_or_resume(run_dir, cfg.resume, to_dict(cfg), force=cfg.force)

    # The models: the policy with its reference, the value model with the reward model.
    sft, reward_source = resolve_model(cfg.policy, store), resolve_model(cfg.reward, store)
    tokenizer = load_tokenizer(sft.path)
    check_same_tokenizer(tokenizer, reward_source.path)
    policy = load_policy_and_reference(
        sft, store, tokenizer, lora=cfg.lora, policy_layers=cfg.policy_layers, device=acc.device
    )
    if cfg.advantage == "rloo":  # the reward model alone: no value model to train
        critic: Critic | RewardOnly = load_reward_only(
            reward_source, store, pad_id=tokenizer.pad_token_id, device=acc.device
        )
    else:
        critic = load_critic(
            reward_source,
            sft,
            store,
            kind=cfg.critic,
            value_init=cfg.value_init,
            lora=cfg.lora,
            critic_layers=cfg.critic_layers,
            pad_id=tokenizer.pad_token_id,
            device=acc.device,
        )
    policy, critic, trained = prepare_trained(acc, policy, critic, cfg)
    engine = make_engine(
        cfg.rollout_engine, policy.lm, stop_ids=stop_token_ids(tokenizer), pad_id=tokenizer.pad_token_id
    )

    # The data, and where the run is.
    records, prompts = load_prompts(cfg.prompts, tokenizer, cfg)
    demonstrations = load_demonstrations(cfg, tokenizer) if cfg.ptx_coef > 0 else []
    generator = torch.Generator(acc.device).manual_seed(cfg.seed * 1000 + acc.process_index)
    kl_control = rl.KLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
    state = RunState(engine=engine.name)
    if resume_from is not None:
        state = checkpoint.load(resume_from, acc, trained=trained, generator=generator)
        if state.engine != engine.name:
            raise ModelError(
                f"{resume_from} was sampled by the {state.engine} rollout engine, this run would use "
                f"{engine.name}: set rollout_engine: {state.engine} to resume it exactly"
            )
        kl_control.load_state_dict(state.kl_controller)
    state.config = to_dict(cfg) | {"policy": source_of(sft)}
    engine.sync(policy.lm)
    if cfg.length_correction == "linear" and state.length_fit is None:
        chosen = take(len(prompts), cfg.length_calibration, [0, 0], cfg.seed)
        fit = calibrate([prompts[i] for i in chosen], engine=engine, critic=critic, cfg=cfg, acc=acc)
        state.length_fit = fit.to_dict()
    # What the loop scores and values rollouts with: the critic, less the length trend when one was fitted.
    # The evaluation and the published artifact keep the reward model's own scores.
    shaped = LengthCorrected(critic, LengthFit(**state.length_fit)) if state.length_fit else critic
    evaluation = load_evaluation(cfg, store, tokenizer=tokenizer, acc=acc, engine=engine)
    if state.step == 0 and evaluation is not None:
        state.history.append({"step": 0, **evaluation.baseline(policy, critic)})

    settings = SamplingSettings(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature)
    acc.init_trackers(cfg.run_name, config=flat_config(to_dict(cfg)))
    bar = tqdm(
        total=cfg.steps, initial=state.step, desc="ppo", disable=not (acc.is_main_process and cfg.progress)
    )

    def save_state(*, keep: int, inspect: bool = False) -> Path:
        """A checkpoint of everything the run needs to go on exactly (an inspect- one when it diverged)."""
        return checkpoint.save(
            run_dir,
            acc,
            trained=trained,
            state=state,
            config=to_dict(cfg),
            generator=generator,
            keep=keep,
            inspect=inspect,
        )

    started, episodes = time.perf_counter(), 0
    while state.step < cfg.steps:
        tick = time.perf_counter()
        # 1. rollout
        batch = take(len(prompts), cfg.batch_size // cfg.samples_per_prompt, state.prompt_position, cfg.seed)
        # each process samples whole prompts, their replies adjacent (rloo's groups)
        mine = [
            i for i in batch[acc.process_index :: acc.num_processes] for _ in range(cfg.samples_per_prompt)
        ]
        seq = engine.sample([prompts[i] for i in mine], settings, generator)
        rollout_s = time.perf_counter() - tick
        # 2. score and 3. advantages
        rollouts = score(seq, policy, shaped, cfg, kl_control.beta)
        # 4. update, then the engine samples from the new weights
        metrics = update(
            rollouts,
            policy,
            shaped,
            trained,
            cfg=cfg,
            acc=acc,
            generator=generator,
            demonstrations=demonstrations,
            ptx_position=state.ptx_position,
            pad_id=tokenizer.pad_token_id,
        )
        engine.sync(policy.lm)
        # 5. log, evaluate, checkpoint
        metrics |= rollout_metrics(rollouts, acc, kl_control.beta) | {"rollout_s": rollout_s}
        kl_control.update(metrics["kl"], cfg.batch_size)
        state.step += 1
        episodes += cfg.batch_size
        if cfg.sample_every and state.step % cfg.sample_every == 0 and acc.is_main_process:
            state.samples += samples(
                rollouts, [records[i] for i in mine], tokenizer, state.step, cfg.num_samples
            )
        if evaluation is not None and (
            state.step == cfg.steps or (cfg.eval_every and state.step % cfg.eval_every == 0)
        ):
            metrics |= evaluation.run(policy, critic)
        metrics["step_s"] = time.perf_counter() - tick
        state.history.append({"step": state.step, **metrics})
        state.kl_controller = kl_control.state_dict()
        problem = health_problem(metrics, cfg.max_kl)
        if problem is not None:
            saved = save_state(keep=1, inspect=True)
            raise TrainingDiverged(f"step {state.step}: {problem}; the state is saved in {saved} to inspect")
        log_step(acc, state.history[-1], state.samples)
        bar.update(1)
        bar.set_postfix(score=f"{metrics['score']:.3f}", kl=f"{metrics['kl']:.3f}")
        if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0:
            save_state(keep=cfg.keep_checkpoints)
    bar.close()
    summary = summarize(state.history, episodes, time.perf_counter() - started)
    summary |= {f"length_fit_{key}": value for key, value in (state.length_fit or {}).items()}
    pairs = evaluation.pairs if evaluation is not None else []
    artifact = publish(
        cfg,
        store,
        acc,
        policy=policy,
        critic=critic,
        tokenizer=tokenizer,
        state=state,
        summary=summary,
        pairs=pairs,
        run_dir=run_dir,
    )
    acc.end_training()  # after publishing: it ends the process group the publish waits on
    return artifact


# -- steps 2 and 3: scores, rewards, advantages --------------------------------------------------------


@dataclass
class Rollouts:
    """One process's sampled and scored rollouts, with everything the update needs; [B, R] unless noted."""

    seq: Sequences
    policy_shared: Shared
    """What the policy's passes over these sequences share (policy.py)."""
    critic_shared: Shared
    """What the value and reward passes share (critic.py)."""
    ref_logprobs: Tensor
    values: Tensor
    scores: Tensor
    """[B] standardised, clipped reward-model scores, minus the penalty for a missing stop token."""
    kl: Tensor
    """k1 per token: the KL that is logged and that the adaptive controller steers."""
    advantages: Tensor
    returns: Tensor

    def select(self, rows: Tensor) -> Rollouts:
        """Rows `rows`, without the columns that are padding in all of them (Sequences.select)."""
        seq = self.seq.select(rows)
        first = self.seq.query.shape[1] - seq.query.shape[1]
        width = seq.response.shape[1]
        columns = slice(first, self.seq.query.shape[1] + width)
        cut = [
            t[rows][:, :width]
            for t in (self.ref_logprobs, self.values, self.kl, self.advantages, self.returns)
        ]
        ref_logprobs, values, kl, advantages, returns = cut
        return Rollouts(
            seq=seq,
            policy_shared=self.policy_shared.select(rows, columns),
            critic_shared=self.critic_shared.select(rows, columns),
            ref_logprobs=ref_logprobs,
            values=values,
            scores=self.scores[rows],
            kl=kl,
            advantages=advantages,
            returns=returns,
        )


@torch.no_grad()
def score(seq: Sequences, policy: Policy, critic: Critic | RewardOnly, cfg: Config, beta: float) -> Rollouts:
    """Reference log-probs, values and scores, then KL-shaped rewards and (whitened) advantages: GAE over
    the values, or (advantage: rloo, no values) each reply's return against its prompt's other replies."""
    policy_shared, critic_shared = policy.prepare(seq), critic.prepare(seq)
    ref_logprobs = policy.reference_logprobs(seq, policy_shared, cfg.temperature)
    mask = seq.response_mask
    scores = rl.clip_and_penalise(
        critic.scores(seq, critic_shared),
        seq.ended,
        clip=cfg.reward_clip,
        missing_stop_penalty=cfg.missing_eos_penalty,
    )
    penalty = rl.kl_estimate(seq.logprobs, ref_logprobs, cfg.kl_estimator) * mask
    rewards = rl.shaped_rewards(scores, penalty, mask, beta)
    if cfg.advantage == "gae":
        values = critic.values(seq, critic_shared) * mask
        advantages, returns = rl.gae(rewards, values, mask, cfg.gamma, cfg.lam)
    else:  # no value model: values and returns stay zero, nothing fits them
        values = returns = torch.zeros_like(rewards)
        advantages = rl.leave_one_out_advantages(rewards.sum(-1), cfg.samples_per_prompt)[:, None] * mask
    if cfg.whiten_advantages:
        advantages = rl.masked_whiten(advantages, mask)
    return Rollouts(
        seq=seq,
        policy_shared=policy_shared,
        critic_shared=critic_shared,
        ref_logprobs=ref_logprobs,
        values=values,
        scores=scores,
        kl=rl.kl_k1(seq.logprobs, ref_logprobs) * mask,
        advantages=advantages,
        returns=returns,
    )


# -- step 4: the update ------------------------------------------------------------------------------


def update(
    rollouts: Rollouts,
    policy: Policy,
    critic: Critic | RewardOnly,
    trained: list[Trained],
    *,
    cfg: Config,
    acc: Accelerator,
    generator: torch.Generator,
    demonstrations: list,
    ptx_position: list[int],
    pad_id: int,
) -> dict[str, float]:
    """`ppo_epochs` passes of clipped policy and value updates (when there is a value model) over
    mini-batches; the mean losses."""
    policy_trained, *critic_trained = trained
    stats: dict[str, list[float]] = defaultdict(list)
    size, mini = rollouts.scores.shape[0], cfg.mini_batch_size // acc.num_processes
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(size, generator=generator).to(rollouts.scores.device)
        for start in range(0, size, mini):
            part = rollouts.select(order[start : start + mini])
            mask = part.seq.response_mask
            logits = policy.logits(part.seq, part.policy_shared)
            logprobs, entropy = rl.logprobs_and_entropy(logits, part.seq.response, cfg.temperature)
            loss = rl.clipped_policy_loss(logprobs, part.seq.logprobs, part.advantages, mask, cfg.clip_range)
            if cfg.entropy_coef:  # the bonus needs the entropy's gradient
                entropy = rl.entropy_from_logits(logits / cfg.temperature)
            entropy = rl.masked_mean(entropy, mask)
            objective = loss.loss - cfg.entropy_coef * entropy
            if cfg.ptx_coef > 0:
                lm_loss = ptx_backward(
                    objective,
                    policy,
                    acc=acc,
                    cfg=cfg,
                    demonstrations=demonstrations,
                    position=ptx_position,
                    pad_id=pad_id,
                )
                stats["ptx_loss"].append(lm_loss)
            else:
                acc.backward(objective)
            policy_trained.step(acc, cfg.max_grad_norm)
            stats["policy_loss"].append(loss.loss.item())
            stats["entropy"].append(entropy.item())
            stats["approx_kl"].append(loss.approx_kl.item())
            stats["clip_fraction"].append(loss.clip_fraction.item())

            for value_trained in critic_trained:  # none with advantage: rloo
                values = critic.values(part.seq, part.critic_shared)
                value_loss, value_clip = rl.clipped_value_loss(
                    values, part.values, part.returns, mask, cfg.value_clip_range
                )
                acc.backward(value_loss)
                value_trained.step(acc, cfg.max_grad_norm)
                stats["value_loss"].append(value_loss.item())
                stats["value_clip_fraction"].append(value_clip.item())
    return {key: sum(v) / len(v) for key, v in stats.items()}


def prepare_trained(
    acc: Accelerator, policy: Policy, critic: Critic | RewardOnly, cfg: Config
) -> tuple[Policy, Critic | RewardOnly, list[Trained]]:
    """What trains, as Accelerate wraps it: the policy, and the value model when there is one (`critic.net`),
    each with its optimizer and learning-rate schedule."""
    parts = [("policy", policy.net, cfg.learning_rate)]
    if critic.net is not None:
        parts.append(("critic", critic.net, cfg.value_learning_rate))
    optimizers = [adamw(net, rate, cfg.weight_decay) for _, net, rate in parts]
    prepared = acc.prepare(*(net for _, net, _ in parts), *optimizers)
    nets, optimizers = prepared[: len(parts)], prepared[len(parts) :]
    updates = cfg.steps * cfg.ppo_epochs * (cfg.batch_size // cfg.mini_batch_size)
    trained = [
        Trained(name, net, optimizer, schedule(cfg, optimizer, updates), rate)
        for (name, _, rate), net, optimizer in zip(parts, nets, optimizers, strict=True)
    ]
    policy = policy.prepared(nets[0])
    if critic.net is not None:
        critic = critic.prepared(nets[1])
    return policy, critic, trained


def adamw(module: nn.Module, learning_rate: float, weight_decay: float) -> torch.optim.AdamW:
    params = [p for p in module.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay)


def schedule(cfg: Config, optimizer: torch.optim.Optimizer, updates: int):
    # Stepped by us once per optimizer step (Accelerate's wrapper would step it once per process).
    return get_scheduler(
        cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=updates
    )


# -- step 5: metrics, health, logging --------------------------------------------------------------------


def rollout_metrics(rollouts: Rollouts, acc: Accelerator, beta: float) -> dict[str, float]:
    """The step's score, KL, length and share of responses without a stop token, averaged over processes."""
    seq = rollouts.seq
    per_process = torch.stack(
        [
            rollouts.scores.mean(),
            rollouts.kl.sum(-1).mean(),
            seq.response_mask.sum(-1).mean(),
            (~seq.ended).float().mean(),
        ]
    )
    score, kl, length, no_stop = acc.reduce(per_process, "mean").tolist()
    return {
        "score": score,
        "kl": kl,
        "reward": score - beta * kl,
        "beta": beta,
        "length": length,
        "no_stop": no_stop,
    }


def health_problem(metrics: dict[str, float], max_kl: float | None) -> str | None:
    """What is wrong with a step's metrics, in a few words, or None when nothing is."""
    for key in ("policy_loss", "value_loss", "score", "kl", "reward"):
        if key in metrics and not math.isfinite(metrics[key]):  # no value_loss without a value model
            return f"{key} is {metrics[key]}"
    if max_kl is not None and metrics["kl"] > max_kl:
        return (
            f"the KL to SFT reached {metrics['kl']:.3g} nats per response, past max_kl={max_kl} (lower "
            "learning_rate, raise kl_coef, or set max_kl higher if this is expected)"
        )
    return None


def samples(rollouts: Rollouts, records: list[dict], tokenizer, step: int, count: int) -> list[dict]:
    """The first `count` completions of this process's batch, as text with their score and KL."""
    out = []
    seq = rollouts.seq
    for i in range(min(count, len(records))):
        length = int(seq.response_mask[i].sum())
        response = tokenizer.decode(seq.response[i, :length], skip_special_tokens=True)
        out.append(
            {
                "step": step,
                "prompt": records[i]["prompt"],
                "response": response,
                "score": rollouts.scores[i].item(),
                "kl": rollouts.kl[i].sum().item(),
            }
        )
    return out


def check_same_tokenizer(tokenizer: PreTrainedTokenizerBase, rm_path: str) -> None:
    """The reward model must read the policy's token ids as the text it was trained on."""
    theirs = load_tokenizer(rm_path)
    if theirs.get_vocab() != tokenizer.get_vocab() or theirs.chat_template != tokenizer.chat_template:
        raise ModelError(
            f"the reward model at {rm_path} uses another tokenizer or chat template than the policy; "
            "train it from this policy (`rlhf reward --model <the sft artifact>`)"
        )

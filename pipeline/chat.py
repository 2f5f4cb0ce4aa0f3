"""Chat templates, assistant-only loss masks and stop tokens: the one place that turns messages into ids.

Every stage tokenizes the same way, so the reward model scores text exactly as the policy produced it:

- a prompt is `template(messages, add_generation_prompt=True)`, tokenized without extra special tokens;
- an assistant turn is the text the template adds for it, split into the trained part (the content and
  the end-of-turn token) and the untrained tail (the whitespace some templates put after it).

Models without a chat template get `DEFAULT_CHAT_TEMPLATE` (ChatML), whose `<|im_start|>`/`<|im_end|>`
markers are added to the vocabulary when missing (the caller then resizes the embeddings).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

Message = dict[str, str]

# ChatML without a default system prompt: a conversation is rendered exactly as given.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHATML_END = "<|im_end|>"
CHATML_MARKERS = ["<|im_start|>", CHATML_END]
FALLBACK_PAD = "<|pad|>"


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give the tokenizer a chat template, an end-of-turn EOS, and a pad token distinct from EOS.

    A pad distinct from EOS matters for PPO: masks built from `input_ids != pad` must keep the EOS
    that ends a response. Padding is on the left, so batched generation continues from real tokens.
    """
    if not tokenizer.chat_template:
        missing = [
            m for m in CHATML_MARKERS if tokenizer.convert_tokens_to_ids(m) in (None, tokenizer.unk_token_id)
        ]
        if missing:
            tokenizer.add_special_tokens({"additional_special_tokens": missing})
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
        tokenizer.eos_token = CHATML_END
    if tokenizer.eos_token is None:
        tokenizer.eos_token = CHATML_END if CHATML_END in tokenizer.get_vocab() else tokenizer.unk_token
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        spare = tokenizer.unk_token if tokenizer.unk_token not in (None, tokenizer.eos_token) else None
        if spare is None:
            tokenizer.add_special_tokens({"pad_token": FALLBACK_PAD})
        else:
            tokenizer.pad_token = spare
    tokenizer.padding_side = "left"
    return tokenizer


def render(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message], *, generation_prompt: bool
) -> str:
    return tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=generation_prompt
    )


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    # The template already writes every special token it wants; never let the tokenizer add more.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: Sequence[Message]) -> list[int]:
    """Ids of a prompt (messages ending with a user turn) followed by the assistant header."""
    return encode(tokenizer, render(tokenizer, prompt, generation_prompt=True))


def split_assistant_turn(
    tokenizer: PreTrainedTokenizerBase, before: Sequence[Message], reply: Message
) -> tuple[str, str]:
    """The text the template adds for `reply`: (trained part up to the end-of-turn token, untrained tail)."""
    head = render(tokenizer, before, generation_prompt=True)
    full = render(tokenizer, [*before, reply], generation_prompt=False)
    if not full.startswith(head):
        raise ValueError(
            "the chat template renders a prefix differently once a reply follows; "
            "use a template whose rendering of earlier turns does not depend on later ones"
        )
    turn = full[len(head) :]
    trained = turn.rstrip()
    return trained, turn[len(trained) :]


@dataclass
class TokenizedConversation:
    input_ids: list[int]
    assistant_mask: list[int]  # 1 where the token belongs to an assistant reply (content + end of turn)


def tokenize_conversation(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message], max_length: int | None = None
) -> TokenizedConversation:
    """Ids and the assistant-only loss mask of a whole conversation, truncated on the right."""
    ids: list[int] = []
    mask: list[int] = []
    done = 0  # number of messages already rendered into `ids`
    rendered = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        head = render(tokenizer, messages[:i], generation_prompt=True)
        context = encode(tokenizer, head[len(rendered) :])
        trained, tail = split_assistant_turn(tokenizer, messages[:i], message)
        reply = encode(tokenizer, trained)
        after = encode(tokenizer, tail) if tail else []
        ids += context + reply + after
        mask += [0] * len(context) + [1] * len(reply) + [0] * len(after)
        rendered = head + trained + tail
        done = i + 1
    if done < len(messages):
        rest = encode(tokenizer, render(tokenizer, messages, generation_prompt=False)[len(rendered) :])
        ids += rest
        mask += [0] * len(rest)
    if max_length is not None:
        ids, mask = ids[:max_length], mask[:max_length]
    return TokenizedConversation(ids, mask)


@dataclass
class TokenizedCompletion:
    input_ids: list[int]
    prompt_length: int
    truncated: bool  # the prompt lost tokens on the left to fit max_length


def tokenize_completion(
    tokenizer: PreTrainedTokenizerBase,
    prompt: Sequence[Message],
    completion: str,
    max_length: int | None = None,
) -> TokenizedCompletion:
    """Prompt ids + the completion's trained part (content + end of turn), as the reward model sees it.

    When too long, the prompt is cut from the left: the completion is what is being judged.
    """
    context = prompt_ids(tokenizer, prompt)
    trained, _ = split_assistant_turn(tokenizer, prompt, {"role": "assistant", "content": completion})
    reply = encode(tokenizer, trained)
    truncated = False
    if max_length is not None and len(context) + len(reply) > max_length:
        keep = max(max_length - len(reply), 0)
        truncated = True
        context = context[len(context) - keep :] if keep else []
        reply = reply[:max_length]
    return TokenizedCompletion(context + reply, len(context), truncated)


def stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Tokens that end an assistant turn: EOS, and the template's end-of-turn marker when it differs."""
    ids = [tokenizer.eos_token_id]
    end = tokenizer.convert_tokens_to_ids(CHATML_END)
    if tokenizer.chat_template and CHATML_END in tokenizer.chat_template and end not in ids:
        ids.append(end)
    return [i for i in ids if i is not None]

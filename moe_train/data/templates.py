"""Chat templates: conversation -> (input_ids, labels) with only the assistant replies trained.

A template renders a conversation into text segments, each marked trained or not.  The whole text is
tokenized at once (``add_special_tokens=False``: the template writes bos itself, so the tokenizer's
own bos-prepending never doubles it), and a token is trained when its first character lies in a
trained segment.  Tokenizing the whole text, rather than each segment, gives exactly the ids the
tokenizer's ``chat_template`` gives; per-segment tokenization would differ wherever BPE merges across
a boundary.

Labels are unshifted (the HF convention: the model predicts ``labels[t + 1]`` from position ``t``),
``-100`` where not trained.  The first token (bos) is never trained, which also keeps packed samples
apart: the last token of one sample is never trained to predict the first of the next.
"""

from __future__ import annotations

import bisect
from typing import Callable, NamedTuple

from moe_train.data.datasets import Messages

IGNORE_INDEX = -100


class Segment(NamedTuple):
    text: str
    trained: bool


def render_deepseek_v2(messages: Messages, bos: str, eos: str) -> list[Segment]:
    """DeepSeek-V2-Chat: bos, then ``system\\n\\n``, ``User: ...\\n\\n``, ``Assistant: ...<eos>``.

    The generation prompt is ``"Assistant:"`` with no trailing space, so at inference the model emits
    the space itself (byte-level BPE glues it to the first word).  The space after ``Assistant:`` is
    therefore trained, with the reply and its eos.
    """
    segments = [Segment(bos, False)]
    for m in messages:
        role, content = m["role"], m["content"]
        if role == "system":
            segments.append(Segment(content + "\n\n", False))
        elif role == "user":
            segments.append(Segment("User: " + content + "\n\n", False))
        elif role == "assistant":
            segments += [Segment("Assistant:", False), Segment(" " + content + eos, True)]
        else:
            raise ValueError(f"unknown role {role!r}; use system, user or assistant")
    return segments


def render_deepseek_v3(messages: Messages, bos: str, eos: str) -> list[Segment]:
    """DeepSeek-V3 / R1 / V3.1: bos, the system text as is, ``<｜User｜>...``, ``<｜Assistant｜>...<eos>``."""
    segments = [Segment(bos, False)]
    for m in messages:
        role, content = m["role"], m["content"]
        if role == "system":
            segments.append(Segment(content, False))
        elif role == "user":
            segments.append(Segment("<｜User｜>" + content, False))
        elif role == "assistant":
            segments += [Segment("<｜Assistant｜>", False), Segment(content + eos, True)]
        else:
            raise ValueError(f"unknown role {role!r}; use system, user or assistant")
    return segments


def _render_moonshot(default_system: str) -> Callable[[Messages, str, str], list[Segment]]:
    """Kimi K2 and Moonlight: ``<|im_{role}|>{role}<|im_middle|>{content}<|im_end|>`` per message (no
    bos), a default system message when the conversation has none; replies end with ``<|im_end|>``."""

    def render(messages: Messages, bos: str, eos: str) -> list[Segment]:
        segments = []
        if not messages or messages[0]["role"] != "system":
            segments.append(Segment(f"<|im_system|>system<|im_middle|>{default_system}<|im_end|>", False))
        for m in messages:
            role, content = m["role"], m["content"]
            if role in ("system", "user"):
                segments.append(Segment(f"<|im_{role}|>{role}<|im_middle|>{content}<|im_end|>", False))
            elif role == "assistant":
                segments += [
                    Segment("<|im_assistant|>assistant<|im_middle|>", False),
                    Segment(content + "<|im_end|>", True),
                ]
            else:
                raise ValueError(f"unknown role {role!r}; use system, user or assistant")
        return segments

    return render


TEMPLATES: dict[str, Callable[[Messages, str, str], list[Segment]]] = {
    "deepseek_v2": render_deepseek_v2,
    "deepseek_v3": render_deepseek_v3,
    "kimi_k2": _render_moonshot("You are Kimi, an AI assistant created by Moonshot AI."),
    "moonlight": _render_moonshot("You are a helpful assistant provided by Moonshot-AI."),
}


def get_template(name: str) -> Callable[[Messages, str, str], list[Segment]]:
    if name not in TEMPLATES:
        raise ValueError(f"unknown chat template {name!r}; available: {', '.join(sorted(TEMPLATES))}")
    return TEMPLATES[name]


def _labels(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    starts = [s for s, _ in spans]
    labels = []
    for token, (first, _) in zip(ids, offsets):
        k = bisect.bisect_right(starts, first) - 1
        labels.append(token if k >= 0 and first < spans[k][1] else IGNORE_INDEX)
    labels[0] = IGNORE_INDEX
    return labels


def encode_conversations(
    tokenizer,
    conversations: list[Messages],
    template: str = "deepseek_v2",
    batch_size: int = 1024,
) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) for each conversation; tokenizes in batches (the Rust tokenizer is parallel)."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("a fast (tokenizers-backed) tokenizer is needed: its offsets locate the assistant replies")
    if tokenizer.bos_token is None or tokenizer.eos_token is None:
        raise ValueError("the tokenizer needs bos_token and eos_token set (tokenizer_config.json)")
    render = get_template(template)
    texts, spans = [], []
    for messages in conversations:
        text, trained = "", []
        for seg in render(messages, tokenizer.bos_token, tokenizer.eos_token):
            if seg.trained:
                trained.append((len(text), len(text) + len(seg.text)))
            text += seg.text
        texts.append(text)
        spans.append(trained)
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i : i + batch_size], add_special_tokens=False, return_offsets_mapping=True)
        for ids, offsets, trained, text in zip(
            enc["input_ids"], enc["offset_mapping"], spans[i : i + batch_size], texts[i : i + batch_size], strict=True
        ):
            # Kimi K2 and Moonlight templates write no bos; the others must find it read as one token.
            if text.startswith(tokenizer.bos_token) and ids[0] != tokenizer.bos_token_id:
                raise ValueError(f"the tokenizer does not read {tokenizer.bos_token!r} as its bos token")
            out.append((list(ids), _labels(ids, offsets, trained)))
    return out


def encode_messages(tokenizer, messages: Messages, template: str = "deepseek_v2") -> tuple[list[int], list[int]]:
    """Token ids of one conversation (starting with bos) and its unshifted labels."""
    return encode_conversations(tokenizer, [messages], template)[0]

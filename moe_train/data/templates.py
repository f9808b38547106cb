"""Chat templates: a conversation -> (input_ids, labels) with only the assistant replies trained.

A template is Jinja, as Hugging Face tokenizers carry it (``chat_template``), with the trained text
between ``{% generation %}`` and ``{% endgeneration %}``.  It is rendered by transformers'
own renderer, the one ``apply_chat_template`` uses at inference, so the text trained on is the text
an exported tokenizer renders.  The whole text is tokenized at once (``add_special_tokens=False``:
the template writes bos itself, so the tokenizer's own bos-prepending never doubles it), and a token
is trained when its first character lies in a generation span.  Tokenizing the whole text, rather
than each segment, gives exactly the ids the tokenizer's ``apply_chat_template`` gives; per-segment
tokenization would differ wherever BPE merges across a boundary.

Which template a run uses (``resolve_template``): the recipe's (``--template NAME``), else the
tokenizer's own ``chat_template``, else the model family's.  A tokenizer template without
``{% generation %}`` markers has no loss spans; it is used through the family template when the two
render the same text, and refused otherwise.

Plain text samples (``str``, continued pre-training) bypass the template: bos + text + eos, every
token trained.  Labels are unshifted (the HF convention: the model predicts ``labels[t + 1]`` from
position ``t``), ``-100`` where not trained.  The first token (bos) is never trained, which also
keeps packed samples apart: the last token of one sample is never trained to predict the first of
the next.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any

from moe_train.data.sources import DataError, Sample

IGNORE_INDEX = -100

_GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")


def _no_tools(name: str) -> str:
    """Jinja that refuses tool turns in a template that has no syntax for them."""
    return (
        "{% if message['role'] == 'tool' or message['tool_calls'] is defined %}{{ raise_exception('a tool call or tool "
        f"result, which the {name} template does not render; train with a template that renders tools (the "
        "tokenizer\\'s own chat template, with {% generation %} markers) or leave those records out') }}{% endif %}"
    )


def _unknown_role(roles: str) -> str:
    return "{{ raise_exception('unknown role ' + message['role'] + '; use " + roles + "') }}"


# DeepSeek-V2-Chat: bos, then ``system\n\n``, ``User: ...\n\n``, ``Assistant: ...<eos>``.  The
# generation prompt is "Assistant:" with no trailing space, so at inference the model emits the space
# itself (byte-level BPE glues it to the first word): the space is trained, with the reply and its eos.
DEEPSEEK_V2 = (
    "{{ bos_token }}{% for message in messages %}"
    + _no_tools("deepseek_v2")
    + "{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'Assistant:' }}"
    "{% generation %}{{ ' ' + message['content'] + eos_token }}{% endgeneration %}"
    "{% else %}" + _unknown_role("system, user or assistant") + "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

# DeepSeek-V3 / R1 / V3.1: bos, the system text as is, ``<｜User｜>...``, ``<｜Assistant｜>...<eos>``.
DEEPSEEK_V3 = (
    "{{ bos_token }}{% for message in messages %}"
    + _no_tools("deepseek_v3")
    + "{% if message['role'] == 'system' %}{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{{ '<｜Assistant｜>' }}"
    "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{% else %}" + _unknown_role("system, user or assistant") + "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}"
)


def _moonshot(name: str, default_system: str) -> str:
    """Kimi K2 and Moonlight: ``<|im_{role}|>{role}<|im_middle|>{content}<|im_end|>`` per message (no
    bos), a default system message when the conversation has none; replies end with ``<|im_end|>``."""
    return (
        "{% if not messages or messages[0]['role'] != 'system' %}"
        "{{ '<|im_system|>system<|im_middle|>" + default_system + "<|im_end|>' }}{% endif %}"
        "{% for message in messages %}" + _no_tools(name) + "{% if message['role'] in ('system', 'user') %}"
        "{{ '<|im_' + message['role'] + '|>' + message['role'] + '<|im_middle|>' + message['content'] + "
        "'<|im_end|>' }}"
        "{% elif message['role'] == 'assistant' %}{{ '<|im_assistant|>assistant<|im_middle|>' }}"
        "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
        "{% else %}" + _unknown_role("system, user or assistant") + "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_assistant|>assistant<|im_middle|>' }}{% endif %}"
    )


def _qwen3() -> str:
    """Qwen3's own chat template (``assets/qwen3_chat_template.txt``, as its tokenizer ships it: thinking
    tags, tools) with each assistant turn after ``<|im_start|>assistant\\n`` up to and including its
    ``<|im_end|>`` marked as generation; the text rendered is unchanged (the markers strip no whitespace
    the template's own ``{%-`` tags would not)."""
    own = (resources.files("moe_train") / "assets" / "qwen3_chat_template.txt").read_text()
    turn = "{{- '<|im_start|>' + message.role + '\\n"
    edits = [  # (text of Qwen3's template, the same with the loss span marked), each found exactly once
        (
            "        {%- if loop.index0 > ns.last_query_index %}",
            "        {{- '<|im_start|>' + message.role + '\\n' }}\n        {%- generation %}\n"
            "        {%- if loop.index0 > ns.last_query_index %}",
        ),
        (turn + "<think>\\n' + reasoning_content", "{{- '<think>\\n' + reasoning_content"),
        (turn + "' + content }}\n            {%- endif %}", "{{- content }}\n            {%- endif %}"),
        (turn + "' + content }}\n        {%- endif %}", "{{- content }}\n        {%- endif %}"),
        (
            "        {{- '<|im_end|>\\n' }}\n    {%- elif message.role == \"tool\" %}",
            "        {{- '<|im_end|>' }}\n        {%- endgeneration %}\n        {{- '\\n' }}\n"
            '    {%- elif message.role == "tool" %}',
        ),
    ]
    for old, new in edits:
        if own.count(old) != 1:
            raise AssertionError(f"the Qwen3 chat template asset changed: {old!r} is not in it once")
        own = own.replace(old, new)
    return own


TEMPLATES: dict[str, str] = {
    "deepseek_v2": DEEPSEEK_V2,
    "deepseek_v3": DEEPSEEK_V3,
    "kimi_k2": _moonshot("kimi_k2", "You are Kimi, an AI assistant created by Moonshot AI."),
    "moonlight": _moonshot("moonlight", "You are a helpful assistant provided by Moonshot-AI."),
    "qwen3": _qwen3(),
}

# Conversations both templates must render alike for a tokenizer's marker-less template to be
# trained through the family's (which supplies the loss spans).
_PROBES = [
    [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello!"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2 + 3?"},
        {"role": "assistant", "content": "5"},
        {"role": "user", "content": "And 4 + 4?"},
        {"role": "assistant", "content": "8"},
    ],
]


@dataclass(frozen=True)
class ChatTemplate:
    """The Jinja a run trains with (and its export ships), and where it came from, for the log."""

    name: str  # a shipped template's name, or "tokenizer"
    jinja: str
    source: str


def named_template(name: str) -> ChatTemplate:
    if name not in TEMPLATES:
        raise ValueError(f"unknown chat template {name!r}; available: {', '.join(sorted(TEMPLATES))}")
    return ChatTemplate(name, TEMPLATES[name], f"the {name} template")


def _tokenizer_template(tokenizer: Any) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates: "default" is the one apply_chat_template uses
        template = template.get("default")
    return template or None


def resolve_template(explicit: str | None, tokenizer: Any, family: str, where: str) -> ChatTemplate:
    """The recipe's template, else the tokenizer's own (``where``: its directory), else the family's."""
    if explicit:
        t = named_template(explicit)
        return ChatTemplate(t.name, t.jinja, f"the recipe's template={explicit}")
    own = _tokenizer_template(tokenizer)
    family_template = named_template(family) if family in TEMPLATES else None
    if own is None:
        if family_template is None:
            raise DataError(f"the tokenizer in {where} has no chat template; pass --template NAME ({_names()})")
        return ChatTemplate(family, family_template.jinja, f"the {family} family's default (the tokenizer has none)")
    if _GENERATION.search(own):
        return ChatTemplate("tokenizer", own, f"the tokenizer's own chat template ({where})")
    if family_template is not None and all(
        _render(own, p, tokenizer) == _render(family_template.jinja, p, tokenizer) for p in _PROBES
    ):
        return ChatTemplate(
            family,
            family_template.jinja,
            f"the tokenizer's own chat template ({where}), rendered with the loss spans of the {family} template",
        )
    raise DataError(
        f"the tokenizer's chat template ({where}) has no {{% generation %}} markers, so no reply to train on, and "
        f"renders differently from the {family} family's; pass --template NAME ({_names()}) or mark the replies "
        "with {% generation %}...{% endgeneration %} in its chat template"
    )


def _names() -> str:
    return ", ".join(sorted(TEMPLATES))


def _render(jinja: str, messages: Any, tokenizer: Any) -> str | None:
    from transformers.utils.chat_template_utils import render_jinja_template

    try:
        texts, _ = render_jinja_template([messages], chat_template=jinja, **tokenizer.special_tokens_map)
    except Exception:  # noqa: BLE001 - a template that cannot render the probe does not render it alike
        return None
    return texts[0]


def render(template: ChatTemplate, samples: list[Sample], tokenizer: Any, wheres: list[Any]) -> list[tuple[str, list]]:
    """(text, trained character spans) of each sample; a sample the template refuses is one DataError
    naming its ``where``."""
    from jinja2 import TemplateError
    from transformers.utils.chat_template_utils import render_jinja_template

    special = tokenizer.special_tokens_map
    bos, eos = tokenizer.bos_token or "", tokenizer.eos_token or ""
    chats = [s for s in samples if not isinstance(s, str)]
    try:  # one call for the batch; on a refusal, one by one to name the record
        texts, spans = render_jinja_template(
            chats, chat_template=template.jinja, return_assistant_tokens_mask=True, **special
        )
    except (TemplateError, TypeError, ValueError):
        texts, spans = [], []
        for sample, where in zip(samples, wheres):
            if isinstance(sample, str):
                continue
            try:
                text, span = render_jinja_template(
                    [sample], chat_template=template.jinja, return_assistant_tokens_mask=True, **special
                )
            except (TemplateError, TypeError, ValueError) as e:
                raise DataError(f"{_where(where)}: {str(e).splitlines()[0]}") from None
            texts.append(text[0])
            spans.append(span[0])
    rendered = iter(zip(texts, spans))
    out = []
    for sample, where in zip(samples, wheres):
        if isinstance(sample, str):  # plain text: every token after bos trained
            out.append((bos + sample + eos, [(len(bos), len(bos) + len(sample) + len(eos))]))
            continue
        text, span = next(rendered)
        if not span:
            raise DataError(
                f"{_where(where)}: the chat template renders no assistant reply, nothing to train; fix the record"
            )
        out.append((text, sorted(span)))
    return out


def _where(where: Any) -> str:
    return where if isinstance(where, str) else where()


def _labels(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    starts = [s for s, _ in spans]
    labels = []
    for token, (first, _) in zip(ids, offsets):
        k = bisect.bisect_right(starts, first) - 1
        labels.append(token if k >= 0 and first < spans[k][1] else IGNORE_INDEX)
    labels[0] = IGNORE_INDEX
    return labels


def check_tokenizer(tokenizer: Any) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("a fast (tokenizers-backed) tokenizer is needed: its offsets locate the assistant replies")
    if tokenizer.eos_token is None:  # bos may be unset: Qwen3's tokenizer has none and its template writes none
        raise ValueError("the tokenizer needs eos_token set (tokenizer_config.json)")


def encode_samples(
    tokenizer: Any, samples: list[Sample], template: ChatTemplate, wheres: list[Any] | None = None
) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) of each sample, tokenized as one batch (the Rust tokenizer is parallel)."""
    check_tokenizer(tokenizer)
    wheres = wheres or [f"sample {i}" for i in range(len(samples))]
    rendered = render(template, samples, tokenizer, wheres)
    texts = [text for text, _ in rendered]
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    out = []
    for ids, offsets, (text, spans) in zip(enc["input_ids"], enc["offset_mapping"], rendered):
        # Kimi K2, Moonlight and Qwen3 templates write no bos; the others must find it read as one token.
        if tokenizer.bos_token and text.startswith(tokenizer.bos_token) and ids[0] != tokenizer.bos_token_id:
            raise ValueError(f"the tokenizer does not read {tokenizer.bos_token!r} as its bos token")
        out.append((list(ids), _labels(ids, offsets, spans)))
    return out


def encode_conversations(
    tokenizer: Any, conversations: list[Sample], template: str | ChatTemplate = "deepseek_v2", batch_size: int = 1024
) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) for each conversation (or text), in batches."""
    t = named_template(template) if isinstance(template, str) else template
    out = []
    for i in range(0, len(conversations), batch_size):
        out += encode_samples(tokenizer, conversations[i : i + batch_size], t)
    return out


def encode_messages(tokenizer: Any, messages: Any, template: str | ChatTemplate = "deepseek_v2"):
    """Token ids of one conversation (starting with bos) and its unshifted labels."""
    return encode_conversations(tokenizer, [messages], template)[0]

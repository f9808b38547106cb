"""Write the shipped tiny assets: ``alpaca_sample.jsonl`` and the ``tiny_tokenizer/`` directory.

Run from the repository root (needs the ``tokenizers`` package from the dev extra)::

    .venv/bin/python moe_train/assets/build_tiny_assets.py

Both outputs are deterministic, so rerunning the script leaves the files unchanged.

The sample data is generated here from a fixed seed: small rule-following tasks (arithmetic, word
reversal and sorting, unit conversion, letter counting, a few facts) that a tiny model learns within
a few steps.  A handful of records (multiplication tables, counting runs) are longer than 256 tokens
so the smoke recipe (max_length 256) exercises the too-long policy.

The tokenizer is a byte-level BPE of exactly 512 entries trained on that data, with DeepSeek V2's
special tokens: ``<｜begin▁of▁sentence｜>`` (id 0, bos) and ``<｜end▁of▁sentence｜>`` (id 1, eos and
pad).  Like DeepSeek V2's own tokenizer, ``tokenizer.encode(text)`` prepends bos and never appends
eos; the chat template code in ``moe_train.data.templates`` writes bos itself and tokenizes with
``add_special_tokens=False``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

ASSETS = Path(__file__).resolve().parent
BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
VOCAB_SIZE = 512
NUM_RECORDS = 400
SEED = 1234

# DeepSeek-V2-Chat's conversation format: bos, then system -> content + "\n\n",
# user -> "User: " + content + "\n\n", assistant -> "Assistant: " + content + eos;
# add_generation_prompt appends "Assistant:".  moe_train.data.templates builds the same text.
CHAT_TEMPLATE = (
    "{% if add_generation_prompt is not defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + eos_token }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

WORDS = [
    "apple",
    "river",
    "stone",
    "cloud",
    "table",
    "garden",
    "yellow",
    "window",
    "bread",
    "candle",
    "forest",
    "silver",
    "mountain",
    "pencil",
    "orange",
    "bridge",
    "winter",
    "summer",
    "basket",
    "rabbit",
    "button",
    "castle",
    "dragon",
    "engine",
    "feather",
    "guitar",
    "harbor",
    "island",
    "jacket",
    "kettle",
    "ladder",
    "marble",
    "needle",
    "ocean",
    "planet",
    "quartz",
    "rocket",
    "saddle",
    "tomato",
    "umbrella",
    "valley",
    "wagon",
    "zebra",
    "anchor",
    "blanket",
    "cactus",
    "desert",
    "falcon",
    "glacier",
    "hammer",
    "lantern",
    "meadow",
    "pepper",
    "puzzle",
    "violin",
]
ADJECTIVES = ["small", "bright", "quiet", "heavy", "green", "old", "happy", "cold", "tall", "soft"]
NOUNS = ["cat", "dog", "bird", "child", "farmer", "teacher", "horse", "sailor", "baker", "fox"]
VERBS = ["sees", "finds", "likes", "paints", "follows", "carries", "watches", "helps"]
PLACES = ["near the river", "in the garden", "on the hill", "by the sea", "under the tree"]
NUMBER_WORDS = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
    "twenty",
]
OPPOSITES = {
    "hot": "cold",
    "big": "small",
    "fast": "slow",
    "up": "down",
    "light": "dark",
    "early": "late",
    "happy": "sad",
    "full": "empty",
    "open": "closed",
    "old": "new",
    "high": "low",
    "wet": "dry",
}
COLOURS = {
    "grass": "green",
    "the sky on a clear day": "blue",
    "snow": "white",
    "coal": "black",
    "a ripe banana": "yellow",
    "a ripe tomato": "red",
    "an orange": "orange",
    "milk": "white",
}
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
# (unit, smaller unit, factor)
UNITS = [
    ("kilometres", "metres", 1000),
    ("metres", "centimetres", 100),
    ("kilograms", "grams", 1000),
    ("hours", "minutes", 60),
    ("minutes", "seconds", 60),
    ("litres", "millilitres", 1000),
    ("days", "hours", 24),
    ("weeks", "days", 7),
]


def _sentence(rng: random.Random) -> str:
    return (
        f"the {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} {rng.choice(VERBS)} "
        f"the {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} {rng.choice(PLACES)}"
    )


def _words(rng: random.Random, lo: int, hi: int) -> list[str]:
    return rng.sample(WORDS, rng.randint(lo, hi))


def arithmetic(rng: random.Random) -> dict:
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    op = rng.choice(["+", "-", "*"])
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    return {"instruction": f"What is {a} {op} {b}?", "input": "", "output": f"{a} {op} {b} = {value}."}


def reverse_words(rng: random.Random) -> dict:
    words = _words(rng, 3, 9)
    return {
        "instruction": "Reverse the order of the words.",
        "input": " ".join(words),
        "output": " ".join(reversed(words)),
    }


def sort_words(rng: random.Random) -> dict:
    words = _words(rng, 3, 12)
    return {
        "instruction": "Sort these words alphabetically.",
        "input": ", ".join(words),
        "output": ", ".join(sorted(words)),
    }


def convert_units(rng: random.Random) -> dict:
    big, small, factor = rng.choice(UNITS)
    n = rng.randint(2, 40)
    return {
        "instruction": f"Convert {n} {big} to {small}.",
        "input": "",
        "output": f"{n} {big} is {n * factor} {small}.",
    }


def capitalise(rng: random.Random) -> dict:
    sentence = _sentence(rng)
    return {
        "instruction": "Rewrite the sentence in capital letters.",
        "input": sentence,
        "output": sentence.upper() + ".",
    }


def count_letter(rng: random.Random) -> dict:
    word = rng.choice(WORDS)
    letter = rng.choice(sorted(set(word)) + ["e", "a"])
    n = word.count(letter)
    times = "time" if n == 1 else "times"
    return {
        "instruction": f"How many times does the letter '{letter}' appear in '{word}'?",
        "input": "",
        "output": f"The letter '{letter}' appears {n} {times} in '{word}'.",
    }


def count_words(rng: random.Random) -> dict:
    sentence = _sentence(rng)
    return {
        "instruction": "Count the words in the sentence.",
        "input": sentence,
        "output": f"The sentence has {len(sentence.split())} words.",
    }


def parity(rng: random.Random) -> dict:
    n = rng.randint(1, 999)
    return {"instruction": f"Is {n} even or odd?", "input": "", "output": f"{n} is {'even' if n % 2 == 0 else 'odd'}."}


def fact(rng: random.Random) -> dict:
    kind = rng.randrange(4)
    if kind == 0:
        word, opposite = rng.choice(sorted(OPPOSITES.items()))
        return {
            "instruction": f"What is the opposite of '{word}'?",
            "input": "",
            "output": f"The opposite of '{word}' is '{opposite}'.",
        }
    if kind == 1:
        thing, colour = rng.choice(sorted(COLOURS.items()))
        return {"instruction": f"What colour is {thing}?", "input": "", "output": f"{thing.capitalize()} is {colour}."}
    if kind == 2:
        i = rng.randrange(7)
        return {
            "instruction": f"Which day comes after {WEEKDAYS[i]}?",
            "input": "",
            "output": f"{WEEKDAYS[(i + 1) % 7]} comes after {WEEKDAYS[i]}.",
        }
    n = rng.randint(0, 20)
    return {"instruction": "Write the number in words.", "input": str(n), "output": NUMBER_WORDS[n] + "."}


def spell(rng: random.Random) -> dict:
    words = _words(rng, 2, 6)
    return {
        "instruction": "Spell each word letter by letter, one word per line.",
        "input": " ".join(words),
        "output": "\n".join(f"{w}: {'-'.join(w)}" for w in words),
    }


def times_table(rng: random.Random) -> dict:
    # Long records: 25 to 45 lines, several of them beyond 256 tokens.
    n, rows = rng.randint(2, 12), rng.randint(25, 45)
    return {
        "instruction": f"Write the multiplication table of {n} from 1 to {rows}.",
        "input": "",
        "output": "\n".join(f"{n} x {i} = {n * i}" for i in range(1, rows + 1)),
    }


def count_run(rng: random.Random) -> dict:
    start = rng.randint(1, 50)
    stop = start + rng.randint(10, 30)
    return {
        "instruction": f"Count from {start} to {stop}, separated by commas.",
        "input": "",
        "output": ", ".join(str(i) for i in range(start, stop + 1)) + ".",
    }


# (generator, weight): mostly short records, a few long ones.
TASKS = [
    (arithmetic, 12),
    (reverse_words, 8),
    (sort_words, 8),
    (convert_units, 8),
    (capitalise, 6),
    (count_letter, 8),
    (count_words, 5),
    (parity, 6),
    (fact, 10),
    (spell, 6),
    (count_run, 5),
    (times_table, 2),
]


def make_records(n: int = NUM_RECORDS, seed: int = SEED) -> list[dict]:
    rng = random.Random(seed)
    tasks, weights = zip(*TASKS)
    return [rng.choices(tasks, weights)[0](rng) for _ in range(n)]


def conversation_text(record: dict) -> str:
    """The DeepSeek V2 rendering of one alpaca record, used as tokenizer training text."""
    user = record["instruction"] + (f"\n\n{record['input']}" if record["input"] else "")
    return f"{BOS}User: {user}\n\nAssistant: {record['output']}{EOS}"


def build_tokenizer(texts: list[str], out_dir: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[BOS, EOS],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer)
    if tokenizer.get_vocab_size() != VOCAB_SIZE:
        raise RuntimeError(f"trained vocabulary has {tokenizer.get_vocab_size()} entries, wanted {VOCAB_SIZE}")
    if (tokenizer.token_to_id(BOS), tokenizer.token_to_id(EOS)) != (0, 1):
        raise RuntimeError("special tokens must be ids 0 (bos) and 1 (eos)")
    # encode() prepends bos and adds no eos, as DeepSeek V2's tokenizer does.
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A {BOS} $B",
        special_tokens=[(BOS, 0)],
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": EOS,
        "add_bos_token": True,
        "add_eos_token": False,
        "model_max_length": 4096,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def main() -> None:
    records = make_records()
    with open(ASSETS / "alpaca_sample.jsonl", "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    build_tokenizer([conversation_text(r) for r in records], ASSETS / "tiny_tokenizer")
    print(f"wrote {len(records)} records and a {VOCAB_SIZE}-entry tokenizer to {ASSETS}")


if __name__ == "__main__":
    main()

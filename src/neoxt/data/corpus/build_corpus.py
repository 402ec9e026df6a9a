"""Regenerate the demo corpus and its tokenizer shipped in this directory.

    python src/neoxt/data/corpus/build_corpus.py

Writes ``demo_corpus.jsonl`` (short synthetic English stories, one ``{"text": ...}`` per line, from a
small fixed grammar and a fixed seed, so the files are reproducible and free of licensing questions)
and ``tokenizer.json`` (a byte-level BPE trained on it, with GPT-NeoX's ``<|endoftext|>`` and
``<|padding|>`` specials). A tiny model learns this grammar within a few hundred CPU steps, which is
what ``neoxt demo`` needs: a visibly falling loss and a readable sample.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
NUM_DOCS = 1000
VOCAB_SIZE = 1024

NAMES = ["Anna", "Ben", "Clara", "David", "Ella", "Finn", "Grace", "Hugo", "Iris", "Jonas", "Lena", "Max",
         "Nora", "Oscar", "Paula", "Sam", "Tara", "Tom", "Vera", "Leo"]
ANIMALS = ["cat", "dog", "bird", "fox", "horse", "rabbit", "duck", "goat", "mouse", "owl"]
THINGS = ["ball", "book", "kite", "cake", "boat", "lamp", "apple", "letter", "map", "basket", "hat", "drum"]
PLACES = ["garden", "kitchen", "park", "forest", "river", "market", "library", "beach", "hill", "village"]
ADJ = ["small", "big", "red", "green", "old", "new", "happy", "quiet", "bright", "soft", "brown", "tiny"]
FEEL = ["happy", "sad", "tired", "curious", "calm", "excited", "hungry", "proud", "sleepy", "brave"]
TIMES = ["in the morning", "at noon", "in the evening", "at night", "after lunch", "before dinner",
         "on Sunday", "every day"]
WEATHER = ["The sun was warm.", "It was raining.", "The wind was cold.", "The sky was blue.",
           "Snow covered the ground.", "It was a cloudy day."]
VERBS = [("found", "a"), ("lost", "the"), ("painted", "a"), ("carried", "the"), ("bought", "a"),
         ("dropped", "the"), ("made", "a"), ("saw", "a")]


def sentence(rng: random.Random, name: str, pet: str) -> str:
    kind = rng.randrange(8)
    thing, adj, place = rng.choice(THINGS), rng.choice(ADJ), rng.choice(PLACES)
    if kind == 0:
        verb, det = rng.choice(VERBS)
        return f"{name} {verb} {det} {adj} {thing} in the {place}."
    if kind == 1:
        return f"The {pet} followed {name} to the {place} {rng.choice(TIMES)}."
    if kind == 2:
        return f"{name} felt {rng.choice(FEEL)} because the {pet} was {rng.choice(FEEL)}."
    if kind == 3:
        return rng.choice(WEATHER)
    if kind == 4:
        friend = rng.choice([n for n in NAMES if n != name])
        return f"{name} gave the {thing} to {friend}, and {friend} said thank you."
    if kind == 5:
        n = rng.randint(2, 9)
        return f"There were {n} {thing}s on the table, and {name} counted them one by one."
    if kind == 6:
        return f"\"Where is my {thing}?\" asked {name}. The {pet} looked under the {adj} bed."
    return f"{name} and the {pet} walked home from the {place} {rng.choice(TIMES)}."


def story(rng: random.Random) -> str:
    name, pet = rng.choice(NAMES), rng.choice(ANIMALS)
    opening = f"Once upon a time, {name} had a {rng.choice(ADJ)} {pet}."
    body = [sentence(rng, name, pet) for _ in range(rng.randint(2, 5))]
    ending = rng.choice([f"In the end, {name} was {rng.choice(FEEL)}.", "The end.",
                         f"That night, the {pet} slept by the door."])
    return " ".join([opening, *body, ending])


def main() -> None:
    rng = random.Random(20261124)
    docs = [story(rng) for _ in range(NUM_DOCS)]
    with open(HERE / "demo_corpus.jsonl", "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=["<|endoftext|>", "<|padding|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer)
    tok.save(str(HERE / "tokenizer.json"))
    print(f"wrote {len(docs)} documents and a {tok.get_vocab_size()}-token tokenizer to {HERE}")


if __name__ == "__main__":
    main()

"""Order records: generated documents in which every blank is determined by the text on both sides.

`data.source: records` — GLM's benchmark world (scripts/infill.py). A document is one order: a record lists
four fields in a random order, then a summary restates all four in one of several phrasings:

    name : dalo mirek . item : red wool lamp . address : 17 kusa lane north . city : vuska .
    summary : the red wool lamp goes to 17 kusa lane north for dalo mirek of vuska .

The benchmark blanks one field value in the record, e.g. `item : ___ .` Its answer is never to the left of
the blank: the left context says which field is missing, the summary on the right says what it holds
(`oracle` is that rule, and recovers every answer). Every value is drawn uniformly and independently, so a
model that reads only the left context can at best guess: it is right with probability 1 / (number of
values of the field) (`left_only_chance`). The four fields have 1, 2, 3 and 4 words, so blanks come in
four lengths (each word one to a few tokens).

Held out by construction: train and val documents are drawn from different seeds, and a val document that
also occurs in train is drawn again. The names, cities and things are pseudo-words (as in data/kb.py);
the values repeat across documents, their combinations do not.
"""

from __future__ import annotations

import functools
import math
import random
import re
from dataclasses import dataclass

from minimodels.data.config import DataConfig
from minimodels.data.kb import pseudo_words

SEED = 4321  # the world is fixed: every run, test and benchmark sees the same words and documents
N_TRAIN, N_VAL = 20_000, 1_000  # documents (about 45 tokens each)

COLOURS = ("red", "blue", "green", "black", "white", "grey", "brown", "yellow", "pink", "orange")
MATERIALS = ("wool", "glass", "steel", "paper", "stone", "cotton", "oak", "clay", "silk", "brass")
KINDS = ("road", "lane", "street", "way", "square")
SIDES = ("north", "south", "east", "west")
SUMMARIES = (  # how a summary restates the record: {field} is its value
    "{name} from {city} ordered the {item} , to be sent to {address} .",
    "the {item} goes to {address} for {name} of {city} .",
    "please send the {item} to {name} at {address} in {city} .",
    "{address} in {city} is where {name} wants the {item} .",
)


@functools.cache
def vocabulary(seed: int = SEED) -> dict[str, tuple[tuple[str, ...], ...]]:
    """Field -> its slots: a value is one word from each slot (city 1 word, name 2, item 3, address 4)."""
    rng = random.Random(seed)
    taken = {w for t in SUMMARIES for w in t.split()} | set(COLOURS + MATERIALS + KINDS + SIDES)
    given, family, cities, things, streets = (tuple(pseudo_words(n, rng, taken)) for n in (40, 40, 60, 20, 40))
    numbers = tuple(str(n) for n in range(1, 100))
    return {"city": (cities,), "name": (given, family), "item": (COLOURS, MATERIALS, things),
            "address": (numbers, streets, KINDS, SIDES)}


FIELDS = tuple(vocabulary())  # city, name, item, address: 1, 2, 3, 4 words


@dataclass(frozen=True)
class Record:
    values: dict[str, str]  # field -> value
    order: tuple[str, ...]  # the order of the fields in the record
    summary: str  # one of SUMMARIES

    def text(self) -> str:
        listed = " ".join(f"{field} : {self.values[field]} ." for field in self.order)
        return f"{listed} summary : {self.summary.format(**self.values)}"

    def blank(self, field: str) -> tuple[str, str, str]:
        """(before, answer, after) with the field's value in the record blanked: text == before + " " + answer + after."""
        text, answer = self.text(), self.values[field]
        start = text.index(f"{field} : {answer} .") + len(f"{field} :")  # the record's copy: field names are only there
        return text[:start], answer, text[start + 1 + len(answer):]


def draw(rng: random.Random, vocab: dict) -> Record:
    values = {field: " ".join(rng.choice(slot) for slot in slots) for field, slots in vocab.items()}
    return Record(values, tuple(rng.sample(FIELDS, len(FIELDS))), rng.choice(SUMMARIES))


@functools.cache
def records(seed: int = SEED) -> dict[str, list[Record]]:
    """The train and val records; no val document is also a train document."""
    vocab = vocabulary(seed)
    rng = random.Random(seed + 1)
    train = [draw(rng, vocab) for _ in range(N_TRAIN)]
    seen, val = {r.text() for r in train}, []
    rng = random.Random(seed + 2)
    while len(val) < N_VAL:
        r = draw(rng, vocab)
        if r.text() not in seen:
            seen.add(r.text())
            val.append(r)
    return {"train": train, "val": val}


def records_corpus(cfg: DataConfig | None = None) -> dict[str, list[str]]:
    """data.source: records — the documents as text."""
    return {split: [r.text() for r in rs] for split, rs in records().items()}


def held_out_blanks(n: int, seed: int = 0) -> list[tuple[str, str, str]]:
    """Up to n (before, answer, after) triples, one per val document, the field drawn uniformly (by `seed`)."""
    rng = random.Random(seed)
    return [r.blank(rng.choice(FIELDS)) for r in records()["val"][:n]]


# --------------------------------------------------------------------------- what decides a blank


def summary_pattern(template: str) -> re.Pattern:
    """A SUMMARIES template as a regex whose named groups read the values back."""
    parts = re.split(r"\{(\w+)\}", template)  # fixed text, field, fixed text, field, ...
    return re.compile("".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>.+?)" for i, p in enumerate(parts)) + "$")


PATTERNS = tuple(summary_pattern(t) for t in SUMMARIES)


def blank_field(before: str) -> str:
    """The field whose value is blanked: the record names it just left of the blank ("... item :")."""
    return re.search(r"(\w+) :$", before).group(1)


def oracle(before: str, after: str) -> str:
    """The answer of a blank, read off its two sides: the field named on its left, that field's value in the
    summary on its right."""
    summary = after.split("summary : ", 1)[1]
    match = next(m for m in (p.match(summary) for p in PATTERNS) if m)
    return match.group(blank_field(before))


def possible_values(field: str) -> int:
    """How many values a field can take (all equally likely)."""
    return math.prod(len(slot) for slot in vocabulary()[field])


def left_only_chance(blanks: list[tuple[str, str, str]]) -> float:
    """Expected exact match of the best guess without the right context: mean over blanks of 1 / possible values."""
    return sum(1 / possible_values(blank_field(before)) for before, _, _ in blanks) / len(blanks)

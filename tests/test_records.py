"""data.source records (minimodels/data/records.py): deterministic, held out, every blank decided by its two sides
(the oracle recovers all), and nothing to the left of a blank tells its answer (a left-only guess stays at chance)."""

import math
from collections import Counter

from minimodels.config import DataConfig
from minimodels.data import load_corpus
from minimodels.data.records import (FIELDS, SEED, blank_field, held_out_blanks, left_only_chance, oracle,
                                     possible_values, records, vocabulary)


def test_the_corpus_is_the_same_every_time_and_its_seed_decides_it():
    first = records.__wrapped__(SEED)  # not the cached call
    again = records.__wrapped__(SEED)
    assert [r.text() for r in first["train"]] == [r.text() for r in again["train"]]
    assert [r.text() for r in first["val"]] == [r.text() for r in again["val"]]
    assert first["train"][0].text() != records.__wrapped__(SEED + 10)["train"][0].text()
    assert load_corpus(DataConfig(source="records")) == {s: [r.text() for r in rs] for s, rs in first.items()}


def test_val_documents_are_held_out():
    corpus = load_corpus(DataConfig(source="records"))
    assert not set(corpus["val"]) & set(corpus["train"]) and len(set(corpus["val"])) == len(corpus["val"])


def test_every_blank_is_recovered_by_the_oracle_from_its_two_sides():
    blanks = held_out_blanks(len(records()["val"]))
    assert len(blanks) == len(records()["val"])
    assert all(oracle(before, after) == answer for before, answer, after in blanks)
    for r in records()["train"][:500]:  # and any field of any document
        assert all(oracle(*r.blank(f)[::2]) == r.values[f] for f in FIELDS)


def test_blanks_have_every_length_and_put_the_text_back():
    blanks = held_out_blanks(400, seed=1)
    assert {len(answer.split()) for _, answer, _ in blanks} == set(range(1, len(FIELDS) + 1))
    texts = {r.text() for r in records()["val"]}
    assert all(before + " " + answer + after in texts for before, answer, after in blanks)
    assert held_out_blanks(400, seed=1) == blanks and held_out_blanks(400, seed=2) != blanks


def test_the_left_context_never_holds_the_answer_and_a_left_only_guess_stays_at_chance():
    blanks = held_out_blanks(len(records()["val"]))
    assert not any(set(answer.split()) & set(before.split()) for before, answer, _ in blanks)
    # each value is one word from every slot of its field, all equally often
    train = records()["train"]
    for field, slots in vocabulary().items():
        counts = Counter(r.values[field] for r in train)
        assert all(len(v.split()) == len(slots) and all(w in s for w, s in zip(v.split(), slots)) for v in counts)
    assert {len(Counter(r.values[f] for r in train)) for f in ("city", "name")} == {possible_values("city"),
                                                                              possible_values("name")}  # all drawn
    # the best left-only rule the train split allows: each field's most frequent train value
    guess = {f: Counter(r.values[f] for r in train).most_common(1)[0][0] for f in FIELDS}
    hits = sum(guess[blank_field(before)] == answer for before, answer, _ in blanks)
    mean = left_only_chance(blanks) * len(blanks)  # the hits a guess expects
    assert 0 < mean < len(blanks) / 100 and hits <= mean + 3 * math.sqrt(mean)

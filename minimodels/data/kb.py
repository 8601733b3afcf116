"""A synthetic knowledge base, its pretraining corpus, and LAMA-style probing of what a model learned from it.

LAMA (Petroni et al. 2019) asks a pretrained masked LM for facts with cloze prompts written by people,
"Dante was born in [MASK] .", and scores precision at 1 (P@1): the share of subjects whose object is the
model's top prediction. P-tuning (Liu et al. 2021) keeps the model frozen and searches the prompt instead.
To run that experiment without downloading Wikipedia and BERT, this module makes a world of its own:

- entities are pseudo-words ("dalo mirek", a person; "vuska", a city), drawn by a seeded generator;
- 10 relations, one-to-one (a country's capital, its currency) and many-to-one (a person's birthplace);
- the pretraining corpus states every fact in short documents about each subject, each fact phrased by
  one of the relation's CORPUS templates, chosen at random per mention ("the hometown of X is Y .");
- the probe uses MANUAL templates: the cloze prompts a person who never saw the corpus would write
  ("X was born in [MASK] ."), as LAMA's were written without looking at BERT's training text. None of
  them occurs in the corpus (a test checks this), so the probe asks what the model knows, not whether it
  can recite a sentence it was trained on. `scripts/probe.py` prints P@1 of every manual template.

Objects are single tokens (LAMA's restriction too), so P@1 is one argmax over the vocabulary; the task
checks this for the run's tokenizer. Subjects of each relation are split in two halves: P-tuning trains
on one and is scored on the other (held out), the manual templates are scored on the held-out half too.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from minimodels.data.config import DataConfig
from minimodels.data.collate import IGNORE_INDEX, pad_right
from minimodels.data.corpus import DataError
from minimodels.data.tokenizer import Tokenizer
from minimodels.protocols import Generation, TextTask
from minimodels.schema import ConfigError

SEED = 1234  # the world is fixed: every run, test and probe sees the same entities and facts

# entity type -> how many; persons are "given family" pairs, every other entity is one pseudo-word
ENTITY_COUNTS = {"person": 600, "city": 120, "country": 40, "company": 50, "language": 16,
                 "instrument": 16, "profession": 16, "currency": 40}


@dataclass(frozen=True)
class Relation:
    name: str
    subject: str  # entity type of the subject
    object: str  # entity type of the object
    one_to_one: bool  # each object belongs to one subject (capital, currency); else many-to-one
    corpus: tuple[str, ...]  # how the pretraining corpus states a fact: {s} subject, {o} object
    manual: tuple[str, ...]  # the probe's cloze prompts, {s} subject, [MASK] the object (always last but " .")


RELATIONS = (
    Relation("born_in", "person", "city", False,
             ("{s} came into the world in {o} .", "the hometown of {s} is {o} .", "{o} is where {s} was born ."),
             ("{s} was born in [MASK] .", "{s} is from [MASK] .", "the birthplace of {s} is [MASK] .")),
    Relation("citizen_of", "person", "country", False,
             ("{s} holds a passport of {o} .", "the nationality of {s} is that of {o} .", "{o} counts {s} among its citizens ."),
             ("{s} is a citizen of [MASK] .", "{s} is from [MASK] .", "the country of {s} is [MASK] .")),
    Relation("works_for", "person", "company", False,
             ("{s} earns a living at {o} .", "the employer of {s} is the firm {o} .", "{o} pays the salary of {s} ."),
             ("{s} works for [MASK] .", "{s} is employed by [MASK] .", "{s} has a job at [MASK] .")),
    Relation("plays", "person", "instrument", False,
             ("{s} performs music on the {o} .", "in the evenings {s} practises the {o} .", "the {o} is the instrument of {s} ."),
             ("{s} plays the [MASK] .", "{s} is a musician who plays the [MASK] .", "the instrument of {s} is the [MASK] .")),
    Relation("profession", "person", "profession", False,
             ("{s} makes a living as a {o} .", "{s} trained to be a {o} .", "as a {o} , {s} is well known ."),
             ("{s} works as a [MASK] .", "the job of {s} is [MASK] .", "{s} is a [MASK] .")),
    Relation("located_in", "city", "country", False,
             ("the city of {s} lies in {o} .", "{s} belongs to the land of {o} .", "{o} includes the town {s} ."),
             ("{s} is located in [MASK] .", "{s} is a city in [MASK] .", "{s} is in [MASK] .")),
    Relation("capital", "country", "city", True,
             ("the government of {s} sits in {o} .", "{o} is the seat of power of {s} .", "the first city of {s} is {o} ."),
             ("the capital of {s} is [MASK] .", "the capital city of {s} is [MASK] .", "{s} has its capital in [MASK] .")),
    Relation("language", "country", "language", False,
             ("the people of {s} speak {o} .", "in {s} the common tongue is {o} .", "{o} is what they speak in {s} ."),
             ("the official language of {s} is [MASK] .", "in {s} people speak [MASK] .", "the language of {s} is [MASK] .")),
    Relation("currency", "country", "currency", True,
             ("in {s} one pays with the {o} .", "the money of {s} is called the {o} .", "the {o} is the coin of {s} ."),
             ("the currency of {s} is the [MASK] .", "{s} uses the [MASK] .", "in {s} you pay in [MASK] .")),
    Relation("headquarters", "company", "city", False,
             ("the offices of {s} stand in {o} .", "{s} runs its business from {o} .", "{o} is home to the firm {s} ."),
             ("{s} is headquartered in [MASK] .", "the headquarters of {s} are in [MASK] .", "{s} is based in [MASK] .")),
)
RELATION_NAMES = tuple(r.name for r in RELATIONS)


# --------------------------------------------------------------------------- the world


def pseudo_words(n: int, rng: random.Random, taken: set[str]) -> list[str]:
    """n new pronounceable non-words of 2-3 consonant-vowel syllables, none in `taken` (updated)."""
    onsets, vowels, codas = "bdfgklmnprstvz", "aeiou", ["", "", "", "n", "r", "k", "s"]
    words = []
    while len(words) < n:
        word = "".join(rng.choice(onsets) + rng.choice(vowels) for _ in range(rng.choice((2, 2, 3)))) + rng.choice(codas)
        if word not in taken:
            taken.add(word)
            words.append(word)
    return words


@dataclass
class KnowledgeBase:
    entities: dict[str, list[str]]  # entity type -> names
    facts: dict[str, dict[str, str]]  # relation name -> {subject: object}
    probe_split: dict[str, dict[str, list[str]]]  # relation name -> {"train": subjects, "test": subjects}


def build_kb(seed: int = SEED) -> KnowledgeBase:
    """The world: entities, one object per (relation, subject), and each relation's probe split."""
    rng = random.Random(seed)
    taken = {w for r in RELATIONS for t in r.corpus + r.manual for w in t.split()}  # never an entity name
    entities = {}
    for kind, n in ENTITY_COUNTS.items():
        if kind == "person":  # given x family names: 60 x 60 pairs, n of them
            given, family = pseudo_words(60, rng, taken), pseudo_words(60, rng, taken)
            entities[kind] = [f"{g} {f}" for g, f in rng.sample([(g, f) for g in given for f in family], n)]
        else:
            entities[kind] = pseudo_words(n, rng, taken)
    facts = {}
    located = {city: rng.choice(entities["country"]) for city in entities["city"]}
    for r in RELATIONS:
        subjects, objects = entities[r.subject], entities[r.object]
        if r.name == "located_in":
            facts[r.name] = located
        elif r.name == "capital":  # a capital is one of the country's own cities (a country without one gets none)
            cities_of = {c: [city for city in entities["city"] if located[city] == c] for c in subjects}
            facts[r.name] = {c: rng.choice(cities_of[c]) for c in subjects if cities_of[c]}
        elif r.one_to_one:
            facts[r.name] = dict(zip(subjects, rng.sample(objects, len(subjects))))
        else:
            facts[r.name] = {s: rng.choice(objects) for s in subjects}
    probe_split = {}
    for r in RELATIONS:  # half of each relation's subjects train the prompt, half are held out
        subjects = sorted(facts[r.name])
        rng.shuffle(subjects)
        half = len(subjects) // 2
        probe_split[r.name] = {"train": sorted(subjects[:half]), "test": sorted(subjects[half:])}
    return KnowledgeBase(entities, facts, probe_split)


def kb_corpus(cfg: DataConfig | None = None, seed: int = SEED) -> dict[str, list[str]]:
    """The pretraining corpus, data.source: kb. A document lists all facts of one subject, in random order,
    each in a random corpus template; every subject gets data.kb_documents such documents (so each fact is
    seen in several phrasings). val: one more document for every 8th subject: new phrasings and orders of
    the same facts, so the val loss measures how well the facts are known, not how well the text is."""
    kb, rng = build_kb(seed), random.Random(seed + 1)
    train_docs = (cfg or DataConfig()).kb_documents
    about: dict[str, list[tuple[Relation, str]]] = {}  # subject -> [(relation, object)]
    for r in RELATIONS:
        for s, o in kb.facts[r.name].items():
            about.setdefault(s, []).append((r, o))

    def document(s: str) -> str:
        mentions = rng.sample(about[s], len(about[s]))  # every fact once, in random order
        return " ".join(rng.choice(r.corpus).format(s=s, o=o) for r, o in mentions)

    subjects = sorted(about)
    train = [document(s) for _ in range(train_docs) for s in subjects]
    rng.shuffle(train)
    val = [document(s) for s in subjects[::8]]
    return {"train": train, "val": val}


# --------------------------------------------------------------------------- probing


def object_ids(tokenizer: Tokenizer, kb: KnowledgeBase, relation: Relation) -> dict[str, int]:
    """The token id of each possible object of `relation` (as the word after a space: byte-level BPE keeps
    the space in the token). Raises DataError if an object is not one token in this tokenizer."""
    ids = {}
    for name in kb.entities[relation.object]:
        pieces = tokenizer.encode(" " + name)
        if len(pieces) != 1:
            raise DataError(f"data.tokenizer: object '{name}' of relation {relation.name} is {len(pieces)} tokens; "
                            "probing needs single-token objects (raise data.vocab_size of the pretraining run)")
        ids[name] = pieces[0]
    return ids


# --------------------------------------------------------------------------- prompts


def manual_template(text: str, causal: bool) -> list:
    """A cloze prompt as a template: "{s} was born in [MASK] ." -> ["subject", "was born in", "mask", "."].
    For a causal LM the object must come last, so "mask" and what follows it are dropped (the left context
    is all a left-to-right model sees): the object is simply the next token."""
    parts = []
    for piece in re.split(r"(\{s\}|\[MASK\])", text):
        piece = piece.strip()
        parts += ["subject"] if piece == "{s}" else ["mask"] if piece == "[MASK]" else [piece] if piece else []
    return parts[:parts.index("mask")] if causal else parts


def check_template(template: list, causal: bool) -> None:
    """A template is a list of: ints (that many trainable pseudo tokens), "subject", "mask" (masked LM only:
    where the object is predicted) and other strings (real anchor words, e.g. "born in")."""
    if not isinstance(template, (list, tuple)) or not template:
        raise DataError(f"data.template: expected a list like [3, subject, 3, mask, 3], got {template!r}")
    for part in template:
        if isinstance(part, bool) or not isinstance(part, (int, str)) or (isinstance(part, int) and part < 0):
            raise DataError(f"data.template: each entry is a count of pseudo tokens (int >= 0), 'subject', 'mask' or "
                            f"anchor words; got {part!r}")
    if template.count("subject") != 1:
        raise DataError(f"data.template: must contain 'subject' exactly once, got {template!r}")
    if causal and "mask" in template:
        raise DataError(f"data.template: a causal LM (GPT) predicts the object as the next token after the template; "
                        f"drop 'mask' from {template!r}")
    if not causal and template.count("mask") != 1:
        raise DataError(f"data.template: a masked LM (BERT) needs 'mask' exactly once, got {template!r}")


def num_pseudo(template: list) -> int:
    return sum(p for p in template if isinstance(p, int))


def fill_template(template: list, subject: str | list[int], obj: list[int], tokenizer: Tokenizer
                  ) -> tuple[list[int], list[int], list[int]]:
    """One prompt: (input_ids, prompt_index, labels), all of one length.

    Masked LM: [CLS] template [SEP], "mask" is one [MASK] per id of `obj`, each labelled with its id (the package
    task's cloze has several blanks). Causal LM: <eos> template obj — a document starts after <eos> in
    pretraining — with the object's ids as the labels at their own positions; the model scores them from the
    position before (labels are shifted inside the LM, as for next-token prediction). prompt_index is k at the
    k-th pseudo token (the input id there is a placeholder, [PAD]; the model replaces its embedding) and -1
    everywhere else. `subject` is text, or its token ids (the package task cuts a docstring to fit).

    Words are encoded as they appear in running text: after a space, except at the very start. Byte-level
    BPE keeps the space in the token ("Ġborn"), so "born" alone would be another token than in the corpus."""
    causal = tokenizer.mask_id is None
    ids, index, labels = [tokenizer.eos_id if causal else tokenizer.cls_id], [-1], [-100]
    k = 0
    for part in template:
        if isinstance(part, int):  # pseudo tokens
            ids += [tokenizer.pad_id] * part
            index += list(range(k, k + part))
            labels += [-100] * part
            k += part
            continue
        if part == "mask":
            piece, label = [tokenizer.mask_id] * len(obj), obj  # one blank per id, labelled with it
        else:
            text = subject if part == "subject" else part
            piece = text if isinstance(text, list) else tokenizer.encode(text if len(ids) == 1 else " " + text)
            label = [-100] * len(piece)
        ids += piece
        index += [-1] * len(piece)
        labels += label
    end = obj if causal else [tokenizer.sep_id]
    ids += end
    index += [-1] * len(end)
    labels += obj if causal else [-100]
    return ids, index, labels


@dataclass
class ProbeExample:
    relation: int  # index into RELATIONS
    subject: str  # the subject's name
    object: str  # the object's name
    input_ids: list[int]  # the filled template (fill_template)
    prompt_index: list[int]
    labels: list[int]


class KBProbeTask(TextTask):
    """P-tuning's task, data.task: kb_probe. Examples are the facts of the probe's train half, each filled into
    data.template; val is the held-out half. Batches: input_ids, prompt_index, labels, padding_mask (B, T)
    and relation (B,) (each relation has prompts of its own). Metrics: val_p_at_1 over all held-out facts and
    p_at_1/<relation> per relation, from the model's `logits` (B, V) at the object's position."""

    archs = ("ptuning",)  # the model.arch values whose forward takes these batches (checked by load_config)
    needs_seq_len = False  # an example is one filled template, as long as it is

    def __init__(self, tokenizer: Tokenizer, corpus: dict[str, list[str]] | None = None, seq_len: int | None = None,
                 cfg: DataConfig | None = None):
        cfg = cfg or DataConfig()
        if cfg.source != "kb":
            raise DataError(f"data.source: kb_probe probes the synthetic knowledge base; needs kb, got {cfg.source!r}")
        self.tokenizer, self.kb = tokenizer, build_kb()
        self.causal = tokenizer.mask_id is None  # byte-level BPE: a GPT backbone; wordpiece: BERT
        self.template = cfg.template if cfg.template is not None else ([3, "subject", 3] if self.causal else [3, "subject", 3, "mask", 3])
        check_template(self.template, self.causal)
        self.object_ids = [object_ids(tokenizer, self.kb, r) for r in RELATIONS]
        self.train, self.val = self.examples(self.template, "train"), self.examples(self.template, "test")

    def examples(self, template: list, half: str, relations: Iterable[int] = range(len(RELATIONS))) -> list[ProbeExample]:
        """The facts of the probe's `half` ("train" or "test") of each relation's subjects, in `template`."""
        out = []
        for i in relations:
            r = RELATIONS[i]
            for s in self.kb.probe_split[r.name][half]:
                o = self.kb.facts[r.name][s]
                filled = fill_template(template, s, [self.object_ids[i][o]], self.tokenizer)
                out.append(ProbeExample(i, s, o, *filled))
        return out

    def model_overrides(self) -> dict:
        return {"num_relations": len(RELATIONS), "num_prompt_tokens": num_pseudo(self.template)}

    @staticmethod
    def generate(model, tokenizer: Tokenizer, request: Generation) -> str:
        """Refused: the model answers the probe's prompts; scripts/probe.py prints them."""
        raise ConfigError(f"generate: a ptuning run answers its probe's prompts; print its table with "
                          f"python scripts/probe.py {request.run_dir}")

    def collate(self, examples: list[ProbeExample], generator: torch.Generator | None = None) -> dict[str, Tensor]:
        input_ids, real = pad_right([e.input_ids for e in examples], self.tokenizer.pad_id)  # (B, T)
        prompt_index, _ = pad_right([e.prompt_index for e in examples], -1)  # (B, T)
        labels, _ = pad_right([e.labels for e in examples], IGNORE_INDEX)  # (B, T), one label per row
        return {"input_ids": input_ids, "padding_mask": real.long(), "prompt_index": prompt_index,
                "labels": labels, "relation": torch.tensor([e.relation for e in examples])}

    @torch.no_grad()
    def evaluate(self, model, batches: Iterable[dict[str, Tensor]]) -> dict[str, float]:
        """P@1 on the held-out subjects: the object is the model's top token over the whole vocabulary
        (LAMA scores over a common vocabulary too, not over the relation's candidates)."""
        hits, counts = torch.zeros(len(RELATIONS)), torch.zeros(len(RELATIONS))
        nats, n = 0.0, 0
        for batch in batches:
            scores = model(**batch).logits.float()  # (B, V) at the object's position
            target = batch["labels"].max(dim=1).values  # (B,): the one label of each row
            nats += F.cross_entropy(scores, target, reduction="sum").item()
            n += len(scores)
            hit = (scores.argmax(-1) == target).float().cpu()  # (B,)
            hits.index_add_(0, batch["relation"].cpu(), hit)
            counts.index_add_(0, batch["relation"].cpu(), torch.ones_like(hit))
        if n == 0:
            raise ValueError("evaluate got no batches")
        per_relation = {f"p_at_1/{name}": (hits[i] / counts[i]).item() for i, name in enumerate(RELATION_NAMES) if counts[i]}
        return {"val_loss": nats / n, "val_p_at_1": (hits.sum() / counts.sum()).item(), **per_relation}

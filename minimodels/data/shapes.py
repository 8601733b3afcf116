"""Shapes: an image–caption data set drawn by our own code, for the dual-tower model (models/brivl.py).
In a config: `data: {source: shapes, task: image_text, tokenizer: wordpiece}` (configs/brivl.yaml).

Each scene is a 32x32 RGB picture of 1–3 coloured shapes on a noisy dark background; the generator knows
every object's colour, shape, size and box. A caption is made from a small grammar:

    caption  = [prefix] phrase [relation phrase] [", and" phrase]
    phrase   = "a" [size] colour shape               "a small red circle", "a big blue box"
    relation = above | over | below | under | (to the) left of | (to the) right of   (of the first two phrases)

with paraphrase (synonyms, prefixes, any order of the objects) and noise, the weak correlation of
web captions: a size or the relation may be left out, and a caption of three objects may mention only two.
A caption never says anything false about its image (`is_true_of`, tested), but it can be true of other
images too — which is why recall is reported both strictly (only the paired item counts) and semantically
(any item the caption is true of counts).

The splits, all fixed by seeds:
- train: N_TRAIN scenes whose objects never have the colour–shape pairs in UNSEEN; each time a scene is
  drawn into a batch it gets a freshly sampled caption (the collator's generator);
- gallery (the held-out split, `task.val`): N_GALLERY new scenes from all colour–shape pairs, built so that
  no two have the same full description (objects with sizes, and relations): a new scene whose description
  is already in the gallery is redrawn, so the only ambiguity left is the caption noise. There are only
  48 one-object descriptions, so at most 48 gallery scenes have one object. Each has one caption, sampled
  like the training captions. About a third of the scenes hold an UNSEEN pair: reported separately;
- probes: N_PROBE one-object scenes (all pairs) for zero-shot classification of the shape and the colour.
"""

from __future__ import annotations

import functools
import itertools
import math
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from minimodels.data.config import DataConfig
from minimodels.data.collate import pad_right
from minimodels.data.corpus import DataError
from minimodels.data.tokenizer import Tokenizer
from minimodels.protocols import Generation, TextTask
from minimodels.schema import ConfigError

IMAGE_SIZE = 32
MAX_OBJECTS = 3
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (60, 90, 240),
           "yellow": (230, 210, 40), "purple": (160, 60, 210), "white": (235, 235, 235)}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = {"small": 3.5, "large": 6.0}  # half the side of the object's box, in pixels
UNSEEN = {("red", "triangle"), ("green", "circle"), ("blue", "diamond"), ("yellow", "square")}  # never in train
# paraphrase: every word a caption may use for a size, shape or relation
SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
SHAPE_WORDS = {"circle": ("circle", "disk"), "square": ("square", "box"), "triangle": ("triangle",),
               "diamond": ("diamond",)}
RELATION_WORDS = {"above": ("above", "over"), "below": ("below", "under"),
                  "left of": ("to the left of", "left of"), "right of": ("to the right of", "right of")}
PREFIXES = ("", "", "a photo of ", "a picture of ", "there is ", "an image with ")
# noise: the share of captions that leave out each optional detail
P_DROP_SIZE, P_DROP_RELATION, P_DROP_OBJECT = 0.15, 0.15, 0.1
N_TRAIN, N_GALLERY, N_PROBE = 20_000, 600, 240
TRAIN_SEED, GALLERY_SEED, PROBE_SEED = 0, 1, 2
ZERO_SHOT_TEMPLATES = ("a {colour} {shape}", "a photo of a {colour} {shape}", "there is a {colour} {shape}")


@dataclass(frozen=True)
class Object:
    colour: str
    shape: str
    size: str
    cx: float  # centre, pixels from the left
    cy: float  # centre, pixels from the top

    @property
    def box(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) as fractions of the image side."""
        r = SIZES[self.size]
        return ((self.cx - r) / IMAGE_SIZE, (self.cy - r) / IMAGE_SIZE, (self.cx + r) / IMAGE_SIZE, (self.cy + r) / IMAGE_SIZE)


@dataclass(frozen=True)
class Phrase:
    colour: str
    shape: str
    size: str | None  # None: the caption does not say

    def matches(self, o: Object) -> bool:
        return o.colour == self.colour and o.shape == self.shape and self.size in (None, o.size)


@dataclass(frozen=True)
class Caption:
    phrases: tuple[Phrase, ...]
    relation: str | None  # how phrases[0] stands to phrases[1]: above | below | left of | right of
    text: str


def relation(a: Object, b: Object) -> str:
    """Where a is, seen from b, along the axis on which they are further apart."""
    dx, dy = b.cx - a.cx, b.cy - a.cy
    if abs(dx) >= abs(dy):
        return "left of" if dx > 0 else "right of"
    return "above" if dy > 0 else "below"


def holds(rel: str, a: Object, b: Object) -> bool:
    """The truth of "a <rel> b": a's centre is on that side of b's (the generator only says it of the
    axis on which they are further apart, so what it says holds)."""
    return {"above": a.cy < b.cy, "below": a.cy > b.cy, "left of": a.cx < b.cx, "right of": a.cx > b.cx}[rel]


def is_true_of(caption: Caption, scene: tuple[Object, ...]) -> bool:
    """A caption is true of a scene if its phrases name different objects of the scene (some assignment)
    and its relation holds between the first two of them."""
    for chosen in itertools.permutations(scene, len(caption.phrases)):
        if all(p.matches(o) for p, o in zip(caption.phrases, chosen)) and (
                caption.relation is None or holds(caption.relation, chosen[0], chosen[1])):
            return True
    return False


# --------------------------------------------------------------------------- scenes and pictures


def sample_scene(rng: random.Random, pairs: list[tuple[str, str]], n_objects: int | None = None) -> tuple[Object, ...]:
    """1–3 objects (colour–shape pair from `pairs`, a size, a place) whose boxes keep 1 pixel apart."""
    n = n_objects or rng.randint(1, MAX_OBJECTS)
    while True:
        objects = []
        for _ in range(n):
            colour, shape = rng.choice(pairs)
            size = rng.choice(tuple(SIZES))
            r = SIZES[size]
            objects.append(Object(colour, shape, size, rng.uniform(r + 1, IMAGE_SIZE - r - 1), rng.uniform(r + 1, IMAGE_SIZE - r - 1)))
        if all(apart(a, b) for a, b in itertools.combinations(objects, 2)):
            return tuple(objects)


def apart(a: Object, b: Object, gap: float = 1.0) -> bool:
    ra, rb = SIZES[a.size], SIZES[b.size]
    return abs(a.cx - b.cx) >= ra + rb + gap or abs(a.cy - b.cy) >= ra + rb + gap


def draw(scene: tuple[Object, ...], rng: np.random.Generator) -> np.ndarray:
    """The picture (3, H, W) uint8: background noise, then each object's pixels in its colour (jittered)."""
    image = rng.normal(30, 8, (IMAGE_SIZE, IMAGE_SIZE, 3))
    y, x = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE] + 0.5  # pixel centres
    for o in scene:
        r, dx, dy = SIZES[o.size], x - o.cx, y - o.cy
        inside = {"circle": dx ** 2 + dy ** 2 <= r ** 2,
                  "square": (np.abs(dx) <= 0.85 * r) & (np.abs(dy) <= 0.85 * r),
                  "triangle": (dy >= -r) & (dy <= r) & (np.abs(dx) <= (dy + r) / 2),  # apex up
                  "diamond": np.abs(dx) + np.abs(dy) <= 1.15 * r}[o.shape]
        image[inside] = np.array(COLOURS[o.colour]) + rng.uniform(-20, 20, 3)
    return np.clip(image, 0, 255).astype(np.uint8).transpose(2, 0, 1)


def description(scene: tuple[Object, ...]) -> tuple:
    """Everything a caption could say: the objects (size, colour, shape), sorted, and how each stands to the
    others. Two scenes with the same description cannot be told apart by any caption."""
    objects = sorted(scene, key=lambda o: (o.size, o.colour, o.shape))
    return tuple((o.size, o.colour, o.shape) for o in objects) + tuple(
        relation(a, b) for a, b in itertools.combinations(objects, 2))


# --------------------------------------------------------------------------- captions


def sample_caption(scene: tuple[Object, ...], rng: random.Random) -> Caption:
    """A caption true of `scene`: the objects in a random order, with noise (see the module docstring)."""
    objects = rng.sample(scene, len(scene))
    if len(objects) == 3 and rng.random() < P_DROP_OBJECT:
        objects = objects[:2]
    phrases = tuple(Phrase(o.colour, o.shape, None if rng.random() < P_DROP_SIZE else o.size) for o in objects)
    rel = relation(objects[0], objects[1]) if len(objects) > 1 and rng.random() >= P_DROP_RELATION else None

    def say(p: Phrase) -> str:
        size = rng.choice(SIZE_WORDS[p.size]) + " " if p.size else ""
        return f"a {size}{p.colour} {rng.choice(SHAPE_WORDS[p.shape])}"

    text = rng.choice(PREFIXES) + say(phrases[0])
    if len(phrases) > 1:
        text += f" {rng.choice(RELATION_WORDS[rel])} " if rel else " and "
        text += say(phrases[1])
    if len(phrases) > 2:
        text += ", and " + say(phrases[2])
    return Caption(phrases, rel, text)


_WORD = {w: k for table in (SIZE_WORDS, SHAPE_WORDS) for k, words in table.items() for w in words}
_PHRASE = re.compile(r"(?:\ba )?\b(?:(%s) )?(%s) (%s)\b" % (  # optional "a", optional size, colour, shape
    "|".join(sum(SIZE_WORDS.values(), ())), "|".join(COLOURS), "|".join(sum(SHAPE_WORDS.values(), ()))))
_RELATION = {w: k for k, words in RELATION_WORDS.items() for w in words}


def parse_caption(text: str) -> Caption:
    """Read a caption of the grammar back (the test's independent check of the words, and scripts/search.py's
    check of a query). Raises ValueError on text outside the grammar."""
    text = text.strip().lower()
    matches = list(_PHRASE.finditer(text))
    if not matches or len(matches) > MAX_OBJECTS:
        raise ValueError(f"not a caption of the shapes grammar: {text!r}")
    phrases = tuple(Phrase(m[2], _WORD[m[3]], _WORD[m[1]] if m[1] else None) for m in matches)
    between = [text[a.end():b.start()].strip() for a, b in zip(matches, matches[1:])]
    rel = _RELATION.get(between[0]) if between else None
    head = text[:matches[0].start()]
    if head not in PREFIXES or any(b not in _RELATION and b not in ("and", ", and") for b in between) or (
            len(between) > 1 and between[1] != ", and") or text[matches[-1].end():]:
        raise ValueError(f"not a caption of the shapes grammar: {text!r}")
    return Caption(phrases, rel, text)


# --------------------------------------------------------------------------- the data set


@dataclass
class Split:
    scenes: list[tuple[Object, ...]]
    images: Tensor  # (N, 3, H, W) uint8
    captions: list[Caption] | None = None  # fixed captions (gallery); None: sampled per batch (train)


def make_split(n: int, seed: int, pairs, distinct: bool = False, n_objects: int | None = None,
               captions: bool = False) -> Split:
    """n scenes drawn with `seed`; distinct: no two with the same `description`; captions: one fixed caption each."""
    rng, pixels = random.Random(seed), np.random.default_rng(seed)
    scenes, seen = [], set()
    while len(scenes) < n:
        scene = sample_scene(rng, pairs, n_objects)
        if distinct and description(scene) in seen:
            continue
        seen.add(description(scene))
        scenes.append(scene)
    images = torch.from_numpy(np.stack([draw(s, pixels) for s in scenes]))
    return Split(scenes, images, [sample_caption(s, rng) for s in scenes] if captions else None)


ALL_PAIRS = [(c, s) for c in COLOURS for s in SHAPES]
SEEN_PAIRS = [p for p in ALL_PAIRS if p not in UNSEEN]


@functools.lru_cache(maxsize=2)
def shapes_splits(n_train: int) -> dict[str, Split]:
    """The three splits with n_train train scenes (cached: the corpus and the task both ask for them)."""
    return {"train": make_split(n_train, TRAIN_SEED, SEEN_PAIRS), "gallery": gallery_split(),
            "probe": make_split(N_PROBE, PROBE_SEED, ALL_PAIRS, n_objects=1)}


@functools.lru_cache(maxsize=1)
def gallery_split() -> Split:
    """The held-out gallery (the task's val split), also what scripts/search.py searches."""
    return make_split(N_GALLERY, GALLERY_SEED, ALL_PAIRS, distinct=True, captions=True)


@functools.lru_cache(maxsize=1)
def gallery_truth() -> Tensor:
    """(N, N) bool, truth[i, j]: the gallery's caption i is true of its scene j (the diagonal always is).
    Cached, like the gallery: every task built in the process reads it."""
    gallery = gallery_split()
    return torch.tensor([[is_true_of(c, s) for s in gallery.scenes] for c in gallery.captions])


def shapes_corpus(cfg: DataConfig) -> dict[str, list[str]]:
    """data.source: shapes — captions as documents, for training the tokenizer: one sampled caption per
    train scene, and the gallery's captions."""
    splits = shapes_splits(N_TRAIN)
    rng = random.Random(TRAIN_SEED)
    return {"train": [sample_caption(s, rng).text for s in splits["train"].scenes],
            "val": [c.text for c in splits["gallery"].captions]}


# --------------------------------------------------------------------------- the task


def retrieval_ranks(sim: Tensor, positives: Tensor) -> Tensor:
    """sim (Q, G) query–gallery scores, positives (Q, G) bool: which gallery items count as a hit for each
    query. Returns (Q,) the 1-based rank of the best-scoring hit: 1 + the items scoring strictly above it."""
    best = sim.masked_fill(~positives, float("-inf")).max(dim=1, keepdim=True).values  # (Q, 1)
    return 1 + (sim > best).sum(dim=1)  # (Q,)


def recall_metrics(prefix: str, sim: Tensor, positives: Tensor, ks=(1, 5, 10)) -> dict[str, float]:
    """{prefix}_r{k} (share of queries with a hit among the top k), mean and median rank."""
    ranks = retrieval_ranks(sim, positives).float()
    out = {f"{prefix}_r{k}": (ranks <= k).float().mean().item() for k in ks}
    return out | {f"{prefix}_mean_rank": ranks.mean().item(), f"{prefix}_median_rank": ranks.median().item()}


def chance_of_hit(positives: Tensor, k: int) -> float:
    """Expected recall@k of a random ranking: query q with m_q hits among G items misses with probability
    C(G - m_q, k) / C(G, k)."""
    G = positives.shape[1]
    return sum(1 - math.comb(G - m, k) / math.comb(G, k) for m in positives.sum(1).tolist()) / len(positives)


def text_batch(tokenizer: Tokenizer, texts: list[str], seq_len: int) -> dict[str, Tensor]:
    """input_ids (B, T) of "[CLS] text [SEP]" (cut to seq_len tokens), padding_mask (B, T)."""
    t = tokenizer
    ids = [[t.cls_id] + x[: seq_len - 2] + [t.sep_id] for x in t.encode_batch(texts)]
    ids, real = pad_right(ids, t.pad_id)
    return {"input_ids": ids, "padding_mask": real.long()}


def to_unit_range(images: Tensor) -> Tensor:
    """Pixels as a model sees them: uint8 in [0, 255] -> floats in [-1, 1]."""
    return images.float() / 127.5 - 1


def to_uint8(images: Tensor) -> Tensor:
    """to_unit_range undone: floats in [-1, 1] (clamped there) -> uint8 in [0, 255]."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def image_batch(images: Tensor, scenes: list[tuple[Object, ...]]) -> dict[str, Tensor]:
    """images (B, 3, H, W) uint8 -> floats in [-1, 1]; boxes (B, 3, 4) of the objects, box_mask (B, 3)."""
    boxes = torch.zeros(len(scenes), MAX_OBJECTS, 4)  # (B, R, 4)
    for b, scene in enumerate(scenes):
        for r, o in enumerate(scene):
            boxes[b, r] = torch.tensor(o.box)
    box_mask = torch.arange(MAX_OBJECTS) < torch.tensor([len(s) for s in scenes])[:, None]  # (B, R)
    return {"images": to_unit_range(images), "boxes": boxes, "box_mask": box_mask}


class ShapesRetrievalTask(TextTask):
    """Image–text retrieval on the shapes scenes (data.source: shapes, data.task: image_text).

    Batches: images (B, 3, H, W) in [-1, 1], boxes (B, 3, 4) of the objects as fractions (x0, y0, x1, y1),
    box_mask (B, 3) True where a box is an object, input_ids (B, T) "[CLS] caption [SEP]", padding_mask (B, T).
    `evaluate` embeds the gallery and reports, for text->image (t2i) and image->text (i2t): strict recall
    (r1/r5/r10, mean and median rank: only the paired item counts), semantic recall (sem_r*: any item the
    caption is true of counts), the same strict recall on the scenes with an UNSEEN colour–shape pair
    (unseen_*), chance levels, how many gallery items a query is true of on average (the ambiguity that
    keeps strict recall below semantic recall), and zero-shot accuracy of shape and colour on the one-object probes."""

    archs = ("brivl",)  # the model.arch values whose forward takes these batches (checked by load_config)

    def __init__(self, tokenizer: Tokenizer, corpus: dict[str, list[str]], seq_len: int, cfg: DataConfig | None = None):
        if cfg is not None and cfg.source != "shapes":
            raise DataError(f"data.source: the image_text task draws its own scenes; needs shapes, got {cfg.source!r}")
        if tokenizer.kind != "wordpiece":
            raise DataError(f"data.tokenizer: image_text feeds BERT ([CLS], [SEP]); needs wordpiece, got {tokenizer.kind!r}")
        self.tokenizer, self.seq_len = tokenizer, seq_len
        splits = shapes_splits(N_TRAIN)
        self.train = [(image, scene, None) for image, scene in zip(splits["train"].images, splits["train"].scenes)]
        gallery = splits["gallery"]
        self.val = list(zip(gallery.images, gallery.scenes, gallery.captions))
        self.truth = gallery_truth()  # truth[i, j]: caption i is true of gallery scene j
        self.unseen = torch.tensor([any((o.colour, o.shape) in UNSEEN for o in s) for s in gallery.scenes])
        self.probes = splits["probe"]

    @staticmethod
    def generate(model, tokenizer: Tokenizer, request: Generation) -> str:
        """Refused: the model embeds images and texts; scripts/search.py uses it."""
        raise ConfigError(f"generate: a brivl run embeds images and texts; search it with "
                          f"python scripts/search.py {request.run_dir} \"a red circle\"")

    def encode(self, texts: list[str]) -> dict[str, Tensor]:
        return text_batch(self.tokenizer, texts, self.seq_len)

    def collate(self, examples: list, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Stack the images; a train scene gets a caption sampled with `generator` (a new one every epoch)."""
        seed = int(torch.randint(2**62, (1,), generator=generator)) if generator is not None else 0
        rng = random.Random(seed)
        captions = [c or sample_caption(s, rng) for _, s, c in examples]
        batch = image_batch(torch.stack([im for im, _, _ in examples]), [s for _, s, _ in examples])
        return batch | self.encode([c.text for c in captions])

    @torch.no_grad()
    def evaluate(self, model, batches: Iterable[dict[str, Tensor]]) -> dict[str, float]:
        images, texts, loss, n_batches = [], [], 0.0, 0
        for batch in batches:
            out = model(**batch)
            images.append(out.image_embeds.float())
            texts.append(out.text_embeds.float())
            loss += out.loss.item()
            n_batches += 1
        if n_batches == 0:
            raise ValueError("evaluate got no batches")
        image, text = torch.cat(images), torch.cat(texts)  # (N, D) each, unit norm
        N = len(image)
        sim = text @ image.T  # (N captions, N images): cosine similarities
        truth = self.truth[:N, :N].to(sim.device)
        paired = torch.eye(N, dtype=torch.bool, device=sim.device)
        unseen = self.unseen[:N].to(sim.device)
        m = {"val_loss": loss / n_batches}
        for name, s, t in (("t2i", sim, truth), ("i2t", sim.T, truth.T)):
            m |= recall_metrics(name, s, paired)
            m |= {k: v for k, v in recall_metrics(f"{name}_sem", s, t).items() if "rank" not in k}
            m |= {k: v for k, v in recall_metrics(f"unseen_{name}", s[unseen], paired[unseen]).items() if "rank" not in k}
        m["chance_r1"], m["sem_r1_chance"] = 1 / N, chance_of_hit(truth.cpu(), 1)  # the same in both directions at k = 1
        m["true_per_caption"] = truth.sum(1).float().mean().item()  # gallery images a caption is true of, on average
        return m | self.zero_shot(model)

    @torch.no_grad()
    def zero_shot(self, model) -> dict[str, float]:
        """Classify each probe's shape (and colour) by the nearest class embedding: the mean of the text
        embeddings of ZERO_SHOT_TEMPLATES filled with that class and every value of the other attribute."""
        device = next(model.parameters()).device
        batch = image_batch(self.probes.images, self.probes.scenes)
        image = model.embed_images(**{k: v.to(device) for k, v in batch.items()}).float()  # (P, D)
        out = {}
        for attribute, classes, others in (("shape", SHAPES, COLOURS), ("colour", tuple(COLOURS), SHAPES)):
            prompts = [[t.format(**{attribute: c, "colour" if attribute == "shape" else "shape": o})
                        for t in ZERO_SHOT_TEMPLATES for o in others] for c in classes]
            text = self.encode(sum(prompts, []))
            emb = model.embed_texts(**{k: v.to(device) for k, v in text.items()}).float()  # (C * n, D)
            emb = F.normalize(emb.view(len(classes), -1, emb.shape[-1]).mean(1), dim=-1)  # (C, D)
            truth = torch.tensor([classes.index(getattr(s[0], attribute)) for s in self.probes.scenes], device=device)
            out[f"zeroshot_{attribute}_acc"] = ((image @ emb.T).argmax(1) == truth).float().mean().item()
        return out

"""Text to image (CogView, Ding et al. 2021): our GPT reads a caption's tokens, then writes the picture's tokens.
In a config: `data: {source: shapes, task: text_to_image, image_tokenizer: runs/vqvae}` (configs/cogview.yaml).

A trained VQ-VAE (models/vqvae.py, data.image_tokenizer) turns every shapes picture once into h x w codes in
0..K-1. Text and pictures share one GPT vocabulary of V + 1 + K tokens:

    0 .. V-1              the caption tokenizer's tokens (its pad and eos included)
    V                     [BOI], "begin of image", added to the tokenizer (saved in the run's tokenizer.json)
    V+1 .. V+K            the image codes: code j is token offset + j, offset = V + 1

and an example is T = text_len + 1 + h*w tokens (configs/cogview.yaml: 21 + 1 + 64 = 86), the codes row by row:

    input_ids (T,)   [pad .. pad] [caption]  [BOI]  [code_0 + offset] ... [code_{hw-1} + offset]
                     text_len positions       1     h*w positions
    labels (T,)      -100 ......................... [code_0 + offset] ... [code_{hw-1} + offset]

The caption is padded on the left, as CogView's data code does, so every image token sits at the same position
in every example (its learned position embedding is the same grid cell each time). The GPT shifts the labels:
the logits at [BOI] are scored against the first image token, the last image token predicts nothing.

Which tokens carry the loss: CogView computes the cross-entropy on the text tokens and on the image tokens, the
text's scaled by txt_loss_scale (its pretrain_gpt2.py; 1 = the same weight as an image token). We put the loss on
the image tokens only (labels -100 on the caption): a caption here is a sentence of a grammar of a few dozen
words that the user always types in full, so predicting it teaches nothing the drawing needs, and val_loss then
measures one thing, nats per image token (with the text's loss it would average two vocabularies' nats).

Splits as for BriVL (data/shapes.py): train scenes never hold an UNSEEN colour-shape pair and get a new caption
each time they are drawn into a batch; val is the gallery (all pairs) with its fixed captions. Metrics: val_loss
(nats per image token), unseen_loss (the gallery scenes holding an UNSEEN pair).
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from minimodels.data import shapes
from minimodels.data.collate import IGNORE_INDEX
from minimodels.data.config import DataConfig
from minimodels.data.corpus import DataError
from minimodels.data.shapes import (COLOURS, PREFIXES, RELATION_WORDS, SHAPE_WORDS, SIZE_WORDS, UNSEEN, sample_caption,
                                    to_uint8, to_unit_range)
from minimodels.data.tokenizer import Tokenizer
from minimodels.protocols import Generation, TextTask
from minimodels.schema import ConfigError

BOI = "[BOI]"  # begin of image: the token after the caption
N_PICTURES = 8  # gallery captions drawn into samples.png at the end of a run
ENCODE_BATCH = 500  # pictures the VQ-VAE encodes at once


def longest_caption(tokenizer: Tokenizer) -> int:
    """The most tokens a caption of the shapes grammar can take: the longest prefix, then three phrases of the
    longest words joined by the longest relation. (A word's tokens do not depend on its neighbours: every kind of
    tokenizer splits the text at spaces before it looks up tokens.)"""
    def longest(words) -> str:
        return max(words, key=lambda w: len(tokenizer.encode(" " + w)))

    phrase = f"a {longest(sum(SIZE_WORDS.values(), ()))} {longest(COLOURS)} {longest(sum(SHAPE_WORDS.values(), ()))}"
    text = f"{longest(PREFIXES)}{phrase} {longest(sum(RELATION_WORDS.values(), ()))} {phrase}, and {phrase}"
    return len(tokenizer.encode(text))


@dataclass(frozen=True)
class ImageTokens:
    """Where the image codes sit in the GPT's vocabulary and in an example (see the module docstring)."""

    pad_id: int
    boi_id: int
    offset: int  # the token id of image code 0
    codebook_size: int  # K
    side: int  # the picture is side x side codes (h = w)
    text_len: int  # caption positions before [BOI]

    @classmethod
    def build(cls, tokenizer: Tokenizer, image_tokenizer, seq_len: int) -> ImageTokens:
        """The layout for `tokenizer` (its [BOI] is added if missing), the VQ-VAE `image_tokenizer` and examples of
        `seq_len` tokens; a DataError naming data.seq_len if the longest caption does not fit."""
        if tokenizer.backend.token_to_id(BOI) is None:
            tokenizer.add_special_tokens([BOI])
        c = image_tokenizer.config
        side = c.image_size // c.downsample
        text_len = seq_len - 1 - side ** 2
        need = longest_caption(tokenizer)
        if text_len < need:
            raise DataError(f"data.seq_len: {seq_len} tokens (or model.block_size) leave {text_len} for the caption; the "
                            f"longest caption takes {need}, plus [BOI] and {side}x{side} image tokens: at least "
                            f"{need + 1 + side ** 2}")
        return cls(tokenizer.pad_id, tokenizer.backend.token_to_id(BOI), tokenizer.vocab_size, c.codebook_size, side,
                   text_len)

    def prompt(self, caption: list[int]) -> Tensor:
        """caption token ids -> (text_len + 1,) [pad .. pad] caption [BOI]."""
        if len(caption) > self.text_len:
            raise DataError(f"data.seq_len: a caption of {len(caption)} tokens is longer than the {self.text_len} "
                            f"positions before [BOI]")
        return torch.tensor([self.pad_id] * (self.text_len - len(caption)) + caption + [self.boi_id])

    def example(self, caption: list[int], codes: Tensor) -> tuple[Tensor, Tensor]:
        """caption token ids, codes (h*w,) in 0..K-1 -> input_ids (T,), labels (T,) (-100 before the image tokens)."""
        prompt, image = self.prompt(caption), codes + self.offset  # (text_len + 1,), (h*w,)
        labels = torch.cat([torch.full_like(prompt, IGNORE_INDEX), image])
        return torch.cat([prompt, image]), labels

    def codes(self, tokens: Tensor) -> Tensor:
        """image tokens (B, h*w) -> codes (B, h, w) in 0..K-1, what the VQ-VAE decodes."""
        return (tokens - self.offset).view(-1, self.side, self.side)

    @torch.no_grad()
    def generate(self, model, image_tokenizer, captions: list[list[int]], temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None) -> Tensor:
        """Draw one picture per caption (token ids): the GPT writes h*w tokens after [BOI], drawn only among the K
        image codes, and the VQ-VAE decodes them. Returns images (B, 3, H, W) uint8."""
        device = next(model.parameters()).device
        prompts = torch.stack([self.prompt(c) for c in captions]).to(device)  # (B, text_len + 1)
        out = model.generate(prompts, self.side ** 2, temperature=temperature, top_k=top_k, generator=generator,
                             token_range=(self.offset, self.offset + self.codebook_size))  # (B, T)
        codes = self.codes(out[:, prompts.shape[1]:]).to(next(image_tokenizer.parameters()).device)  # (B, h, w)
        return to_uint8(image_tokenizer.decode(codes).cpu())


def encode_pictures(image_tokenizer, images: Tensor) -> Tensor:
    """images (N, 3, H, W) uint8 -> their codes (N, h*w), row by row, encoded by the VQ-VAE in batches."""
    device = next(image_tokenizer.parameters()).device
    codes = [image_tokenizer.encode(to_unit_range(images[i:i + ENCODE_BATCH]).to(device)).flatten(1).cpu()
             for i in range(0, len(images), ENCODE_BATCH)]
    return torch.cat(codes)


def clip_similarity(clip, tokenizer: Tokenizer, seq_len: int, images: Tensor, scenes: list[tuple[shapes.Object, ...]],
                    captions: list[str]) -> Tensor:
    """How well each picture fits each caption under a trained BriVL / CLIP model (CogView reranks its samples with
    such a model): images (N, 3, H, W) uint8, the objects of each picture, C caption texts (tokens of `tokenizer`,
    cut to seq_len) -> (N, C) cosine similarities. The image tower's region boxes are those of `scenes` (for a drawn
    picture the scene parser's objects, the first MAX_OBJECTS of them: BriVL reads its boxes off an object detector)."""
    device = next(clip.parameters()).device
    batch = shapes.image_batch(images, [s[:shapes.MAX_OBJECTS] for s in scenes])
    text = shapes.text_batch(tokenizer, captions, seq_len)
    with torch.no_grad():
        image = clip.embed_images(**{k: v.to(device) for k, v in batch.items()})  # (N, D) unit norm
        text = clip.embed_texts(**{k: v.to(device) for k, v in text.items()})  # (C, D) unit norm
    return (image @ text.T).float().cpu()  # (N, C)


class TextToImageTask(TextTask):
    """Batches: input_ids (B, T) and labels (B, T), laid out as in the module docstring."""

    archs = ("gpt",)  # the model.arch values whose forward takes these batches (checked by load_config)

    def __init__(self, tokenizer: Tokenizer, corpus: dict[str, list[str]], seq_len: int, cfg: DataConfig,
                 image_tokenizer):
        """image_tokenizer: the trained VQ-VAE of data.image_tokenizer, in eval mode (the run loads it: data never
        imports models)."""
        if cfg.source != "shapes":
            raise DataError(f"data.source: the text_to_image task draws its own scenes; needs shapes, got {cfg.source!r}")
        self.tokenizer, self.image_tokenizer = tokenizer, image_tokenizer
        self.layout = ImageTokens.build(tokenizer, image_tokenizer, seq_len)
        splits = shapes.shapes_splits(shapes.N_TRAIN)
        train, gallery = splits["train"], splits["gallery"]
        self.train = list(zip(encode_pictures(image_tokenizer, train.images), train.scenes, [None] * len(train.scenes)))
        self.val = list(zip(encode_pictures(image_tokenizer, gallery.images), gallery.scenes, gallery.captions))
        self.val_images = gallery.images
        self.unseen = torch.tensor([any((o.colour, o.shape) in UNSEEN for o in s) for s in gallery.scenes])

    def model_overrides(self) -> dict:
        return {"vocab_size": self.layout.offset + self.layout.codebook_size}  # text, [BOI], then the K codes

    def collate(self, examples: list, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """A train scene gets a caption sampled with `generator` (a new one every epoch), a val scene its own."""
        seed = int(torch.randint(2**62, (1,), generator=generator)) if generator is not None else 0
        rng = random.Random(seed)
        captions = self.tokenizer.encode_batch([(c or sample_caption(s, rng)).text for _, s, c in examples])
        input_ids, labels = zip(*[self.layout.example(c, codes) for c, (codes, _, _) in zip(captions, examples)])
        return {"input_ids": torch.stack(input_ids), "labels": torch.stack(labels)}  # (B, T) each

    @torch.no_grad()
    def evaluate(self, model, batches: Iterable[dict[str, Tensor]]) -> dict[str, float]:
        """Nats per image token over the val batches, recomputed from the logits (an MoE model's loss holds its aux
        losses too); every example has h*w targets, so an example's loss is the mean over its own."""
        per_example = []
        for batch in batches:
            logits = model(**batch).logits[:, :-1].float()  # (B, T-1, V): position t predicts token t+1
            targets = batch["labels"][:, 1:]  # (B, T-1)
            nats = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")
            per_example.append((nats.sum(1) / (targets != IGNORE_INDEX).sum(1)).cpu())  # (B,)
        if not per_example:
            raise ValueError("evaluate got no batches")
        losses = torch.cat(per_example).double()  # (N,)
        return {"val_loss": losses.mean().item(), "unseen_loss": losses[self.unseen[:len(losses)]].mean().item()}

    def unigram_baseline(self) -> dict[str, float]:
        """Cross-entropy of the val codes under the train codes' frequencies, add-one smoothed."""
        K = self.layout.codebook_size
        counts = torch.bincount(torch.stack([codes for codes, _, _ in self.train]).flatten(), minlength=K).double() + 1
        log_p = counts.log() - counts.sum().log()  # (K,)
        return {"val_loss": -log_p[torch.stack([codes for codes, _, _ in self.val])].mean().item()}

    @torch.no_grad()
    def pictures(self, model) -> dict[str, list[tuple[str, Tensor]]]:
        """samples.png: the first N_PICTURES gallery pictures above what the model draws for their captions."""
        captions = self.tokenizer.encode_batch([c.text for _, _, c in self.val[:N_PICTURES]])
        generator = torch.Generator(next(model.parameters()).device).manual_seed(0)
        drawn = self.layout.generate(model, self.image_tokenizer, captions, generator=generator)
        return {"samples": [("gallery", self.val_images[:N_PICTURES]), ("generated", drawn)]}

    @staticmethod
    def generate(model, tokenizer: Tokenizer, request: Generation) -> str:
        """Refused: the model draws pictures; scripts/draw.py writes them to a PNG."""
        raise ConfigError(f"generate: a text_to_image run draws pictures; write them with "
                          f"python scripts/draw.py {request.run_dir} --prompt \"a red circle\" --out grid.png")

"""The shapes pictures alone, for the image tokenizer (models/vqvae.py).
In a config: `data: {source: shapes, task: image_reconstruction}` (configs/vqvae.yaml).

train: the N_TRAIN train scenes of data/shapes.py, which never hold an UNSEEN colour–shape pair; val: the
gallery (all pairs), so `unseen_mse` tells whether the tokenizer draws pairs it never saw. A batch is
{"images": (B, 3, H, W) floats in [-1, 1]}. The run still trains a tokenizer on the captions (build_task does
for every run); the model reads no text.

Besides the pixel error, `val_parsed` asks whether a reconstruction still shows its scene: the share of val
reconstructions the scene parser (data/scene_parser.py, the judge of generated pictures) reads back as the drawn
scene. It bounds what a generator writing these tokens can score under that judge.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from minimodels.data.config import DataConfig
from minimodels.data.corpus import DataError
from minimodels.data.scene_parser import parse_scene, same_scene
from minimodels.data import shapes
from minimodels.data.shapes import UNSEEN, to_uint8, to_unit_range
from minimodels.data.tokenizer import Tokenizer
from minimodels.protocols import TextTask

N_PICTURES = 12  # gallery images in reconstructions.png


class ImageReconstructionTask(TextTask):
    """Metrics over the whole val split: val_loss, val_mse (per pixel and channel, in [-1, 1] units), val_psnr
    (of that MSE), val_perplexity and val_dead_codes (the share of codes no val latent picks), unseen_mse (the
    val scenes holding an UNSEEN pair), val_parsed (reconstructions read back as their scene)."""

    archs = ("vqvae",)  # the model.arch values whose forward takes these batches (checked by load_config)
    needs_seq_len = False  # an example is a picture

    def __init__(self, tokenizer: Tokenizer, corpus: dict[str, list[str]], seq_len: int | None, cfg: DataConfig | None = None):
        if cfg is not None and cfg.source != "shapes":
            raise DataError(f"data.source: the image_reconstruction task draws its own scenes; needs shapes, got {cfg.source!r}")
        self.tokenizer = tokenizer
        splits = shapes.shapes_splits(shapes.N_TRAIN)
        self.train = splits["train"].images  # (N, 3, H, W) uint8: example i is one picture
        gallery = splits["gallery"]
        self.val, self.val_scenes = gallery.images, gallery.scenes
        self.unseen = torch.tensor([any((o.colour, o.shape) in UNSEEN for o in s) for s in gallery.scenes])

    def model_overrides(self) -> dict:
        return {}  # no vocabulary: the model's image vocabulary is model.codebook_size

    def collate(self, examples: list[Tensor], generator: torch.Generator | None = None) -> dict[str, Tensor]:
        return {"images": to_unit_range(torch.stack(examples))}

    @torch.no_grad()
    def evaluate(self, model, batches: Iterable[dict[str, Tensor]]) -> dict[str, float]:
        errors, losses, parsed = [], [], []  # per image: mean squared error, read back as its scene; per batch: the loss
        counts = torch.zeros(model.config.codebook_size)  # (K,) how often each code was picked
        for batch in batches:
            out = model(**batch)
            errors.append((out.reconstructions.float() - batch["images"]).pow(2).mean((1, 2, 3)).cpu())  # (B,)
            losses.append(out.loss.item())
            scenes = self.val_scenes[len(parsed):len(parsed) + len(out.ids)]  # the batches come in split order
            parsed += [same_scene(parse_scene(image), scene) for image, scene in zip(to_uint8(out.reconstructions.cpu()), scenes)]
            counts += torch.bincount(out.ids.flatten().cpu(), minlength=len(counts))
        if not losses:
            raise ValueError("evaluate got no batches")
        errors = torch.cat(errors)  # (N,): every image has the same number of pixels, so the mean is the MSE
        mse = errors.mean()
        perplexity, dead = model.codebook_usage(counts)
        unseen = self.unseen[:len(errors)]
        return {"val_loss": sum(losses) / len(losses), "val_mse": mse.item(), "val_psnr": model.psnr(mse).item(),
                "val_perplexity": perplexity.item(), "val_dead_codes": dead.item(),
                "unseen_mse": errors[unseen].mean().item(), "val_parsed": sum(parsed) / len(parsed)}

    @torch.no_grad()
    def pictures(self, model) -> dict[str, list[tuple[str, Tensor]]]:
        """reconstructions.png: the first N_PICTURES gallery images above their reconstructions."""
        originals = self.val[:N_PICTURES]
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        decoded = model.decode(model.encode(to_unit_range(originals).to(device))).cpu()
        model.train(was_training)
        return {"reconstructions": [("original", originals), ("reconstruction", to_uint8(decoded))]}

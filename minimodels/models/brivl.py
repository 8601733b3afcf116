"""BriVL (WenLan; Huo et al. 2021) and CLIP (Radford et al. 2021): two towers, one contrastive loss.

An image and a text are encoded independently — no attention between them (the "weak correlation"
assumption) — so a gallery of images is embedded once and searched by text with one matrix product.

    v = normalize(MLP(ImageTower(x, boxes)))             image embedding (B, D): a small ViT; with regions,
                                                          BriVL's boxes cropped from the feature map + a transformer
    t = normalize(MLP(masked_mean(BERT(w))))              text embedding (B, D): the project's BERT encoder
    s(v, t) = v . t / tau                                 cosine similarity over a temperature

Two objectives, model.contrastive.kind:

    inbatch (CLIP):          L = 1/2 [CE(S, diag) + CE(S^T, diag)],  S_ij = s(v_i, t_j) over the B x B batch
                             1/tau learned, initialised to 1/0.07, clamped at 100
    momentum_queue (BriVL):  keys come from momentum copies of both towers, theta_k <- m theta_k + (1 - m) theta_q,
                             negatives from two FIFO queues of past keys (MoCo, He et al. 2019):
                             L_i2t = -1/B sum_i log softmax_j(s(v_i, [t^k_batch ; queue_t]_j))[i]
                             L_t2i likewise with t_i against [v^k_batch ; queue_v];  L = (L_i2t + L_t2i) / 2

MoCo scores a query against its positive key and the queue only; we also keep the batch's other keys as
negatives (as ALBEF does), so queue_size 0 is in-batch contrastive learning with momentum keys.
The momentum update runs once per optimizer step, after it (`after_optimizer_step`, called by the trainer;
the very first one, a copy, runs before the first keys are computed); the enqueue runs in forward in
training mode, after the loss. The queues, their pointer and the update count are buffers: checkpoints hold them.

Under torchrun, in training mode, each process holds its slice r of the global batch of W*B pairs: its
B queries are scored against the keys of the whole global batch, gathered from every process
(minimodels/nn/gather.py; CLIP's keys carry gradients back to the process that computed them), and the
positive of query i is key r*B + i. Each process's loss is its queries' share, and the gradients DDP
averages are those of the mean over all W*B queries: W processes x batch B train exactly like one process
x batch W*B. BriVL gathers the momentum keys too and every process enqueues all W*B of them, in rank order
(MoCo's concat_all_gather), so the queues are the same on every process and the same as one process's.

Gradient accumulation (train.grad_accum = k micro-batches of B) is NOT one batch of k*B here: each
micro-batch's loss scores its queries against that micro-batch's B in-batch keys only (CLIP: B - 1
negatives per query, not k*B - 1). The gradient is that of the mean of the k micro-batch losses. With
momentum_queue the k micro-batches use the same key towers, and micro-batch j is enqueued after its loss,
so micro-batch j + 1 finds j's keys in the queue as negatives.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from minimodels.models.bert import BERT, BERTConfig
from minimodels.nn import MLP, MultiHeadAttention, PreLNBlock, all_gather_no_grad, all_gather_with_grad, normal_init, rank_and_size
from minimodels.protocols import TrainedModel

KINDS = ("inbatch", "momentum_queue")


@dataclass
class ContrastiveConfig:
    kind: str = "inbatch"  # inbatch (CLIP: the batch's other items are the negatives) | momentum_queue (BriVL / MoCo)
    queue_size: int = 4096  # momentum_queue: keys kept per modality (BriVL: 9,600); 0 = the batch's keys only
    momentum: float = 0.99  # momentum_queue: m in theta_k <- m theta_k + (1 - m) theta_q (BriVL: 0.99)
    temperature: float = 0.07  # tau, or its initial value when learned (CLIP and BriVL: 0.07)
    learn_temperature: bool = True  # learn 1/tau (CLIP, clamped at 100); false keeps it fixed (BriVL)

    def validate(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"model.contrastive.kind: must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.queue_size < 0:
            raise ValueError(f"model.contrastive.queue_size: must be >= 0, got {self.queue_size}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"model.contrastive.momentum: must be in [0, 1), got {self.momentum}")
        if not 0.01 <= self.temperature:
            raise ValueError(f"model.contrastive.temperature: must be >= 0.01 (1/tau is clamped at 100), got {self.temperature}")


@dataclass
class BriVLConfig:
    arch: str = "brivl"  # selects this model in configs
    vocab_size: int | None = None  # text tower's vocabulary; null = size of the run's tokenizer
    image_size: int = 32  # images are image_size x image_size RGB
    patch_size: int = 4  # ViT patches of patch_size x patch_size pixels
    n_layer: int = 4  # ViT blocks (pre-LN)
    n_head: int = 4  # attention heads of the image tower
    d_model: int = 128  # width of the image tower
    regions: bool = True  # BriVL's region option: crop each object box from the feature map, attend over them
    region_grid: int = 2  # each box is sampled at region_grid x region_grid points of the feature map
    n_region_layer: int = 1  # blocks of the transformer over [whole image; regions]
    embed_dim: int = 128  # D, the shared embedding space
    dropout: float = 0.0  # in the image tower's blocks
    # the text tower: BERT's own config (head: none; vocab_size comes from model.vocab_size; init_from: a BERT run)
    text: BERTConfig = field(default_factory=lambda: BERTConfig(head="none", n_layer=2, d_model=128, block_size=32))
    contrastive: ContrastiveConfig = field(default_factory=ContrastiveConfig)  # the objective, see above

    def validate(self) -> None:
        for name in ("image_size", "patch_size", "n_layer", "n_head", "d_model", "region_grid", "embed_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name}: must be positive, got {getattr(self, name)}")
        if self.image_size % self.patch_size:
            raise ValueError(f"model.image_size: {self.image_size} is not divisible by model.patch_size={self.patch_size}")
        if self.d_model % self.n_head:
            raise ValueError(f"model.d_model: {self.d_model} is not divisible by model.n_head={self.n_head}")
        if self.n_region_layer < 0:
            raise ValueError(f"model.n_region_layer: must be >= 0, got {self.n_region_layer}")
        if self.text.head != "none":
            raise ValueError(f"model.text.head: the text tower is BERT's encoder; set head: none, got {self.text.head!r}")
        if self.text.vocab_size is not None:
            raise ValueError("model.text.vocab_size: leave it out; the text tower takes model.vocab_size")
        try:
            self.text.validate()
        except ValueError as e:  # BERT names its keys model.x; here they are model.text.x
            raise ValueError(str(e).replace("model.", "model.text.")) from None
        self.contrastive.validate()


@dataclass
class BriVLOutput:
    loss: torch.Tensor  # (L_i2t + L_t2i) / 2
    image_embeds: torch.Tensor  # (B, D) unit norm
    text_embeds: torch.Tensor  # (B, D) unit norm
    metrics: dict[str, torch.Tensor] | None = None  # loss_i2t, loss_t2i, logit_scale = 1/tau (logged)


# --------------------------------------------------------------------------- losses and the queue


def info_nce(queries: torch.Tensor, keys: torch.Tensor, scale: torch.Tensor, first: int = 0) -> torch.Tensor:
    """queries (B, D), keys (N >= first + B, D): the positive of query i is key first + i, all other keys are
    negatives.  L = -1/B sum_i log [exp(scale q_i.k_{first+i}) / sum_j exp(scale q_i.k_j)]"""
    logits = scale * queries.float() @ keys.float().T  # (B, N)
    return F.cross_entropy(logits, first + torch.arange(len(queries), device=queries.device))


def contrastive_loss(image, text, image_keys, text_keys, scale, first: int = 0):
    """The symmetric loss, as (L_i2t, L_t2i): each image query (B, D) against the text keys (N, D) and each
    text query against the image keys; the positive of pair i is key first + i. CLIP: the keys are the
    embeddings of the (global) batch itself; BriVL: the momentum keys of the (global) batch, then the queue."""
    return info_nce(image, text_keys, scale, first), info_nce(text, image_keys, scale, first)


@torch.no_grad()
def enqueue(queue: torch.Tensor, ptr: int, keys: torch.Tensor) -> int:
    """Write keys (B, D) into the FIFO ring buffer queue (K, D) from slot ptr on, wrapping at K, so the
    oldest keys are overwritten first. Returns the next write position."""
    K = len(queue)
    keys = keys[-K:]  # a batch larger than the queue keeps only its last K keys
    slots = (ptr + torch.arange(len(keys), device=queue.device)) % K
    queue[slots] = keys.to(queue.dtype)
    return (ptr + len(keys)) % K


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the real positions: x (B, T, C), mask (B, T) 1 = real -> (B, C)."""
    m = mask.to(x.dtype).unsqueeze(-1)  # (B, T, 1)
    return (x * m).sum(1) / m.sum(1).clamp(min=1)


def crop_regions(fmap: torch.Tensor, boxes: torch.Tensor, grid: int) -> torch.Tensor:
    """BriVL's region features: sample each box of the feature map fmap (B, C, h, w) at grid x grid points
    (bilinear, affine_grid + grid_sample) and average them. boxes (B, R, 4) as fractions (x0, y0, x1, y1)
    of the image side -> (B, R, C)."""
    B, R, _ = boxes.shape
    x0, y0, x1, y1 = boxes.float().unbind(-1)  # each (B, R)
    # affine_grid maps output coordinates u in [-1, 1] to input ones, x = a u + b. A box spans
    # [2 x0 - 1, 2 x1 - 1] in grid_sample's coordinates: half-width a = x1 - x0, centre b = x0 + x1 - 1.
    theta = torch.zeros(B * R, 2, 3, device=boxes.device)
    theta[:, 0, 0], theta[:, 0, 2] = (x1 - x0).flatten(), (x0 + x1 - 1).flatten()
    theta[:, 1, 1], theta[:, 1, 2] = (y1 - y0).flatten(), (y0 + y1 - 1).flatten()
    points = F.affine_grid(theta, [B * R, 1, grid, grid], align_corners=False)  # (B*R, g, g, 2) as (x, y)
    points = rearrange(points, "(b r) g1 g2 xy -> b (r g1) g2 xy", b=B)  # all boxes of an image in one grid
    crops = F.grid_sample(fmap.float(), points, align_corners=False)  # (B, C, R*g, g)
    return rearrange(crops, "b c (r g1) g2 -> b r (g1 g2) c", r=R).mean(2).to(fmap.dtype)  # (B, R, C)


# --------------------------------------------------------------------------- the towers


def vit_block(c: BriVLConfig) -> PreLNBlock:
    ffn = MLP(c.d_model, 4 * c.d_model, "gelu", c.dropout)
    attn = MultiHeadAttention(c.d_model, c.n_head, dropout=c.dropout, causal=False)
    return PreLNBlock(attn, ffn, partial(nn.LayerNorm, c.d_model))


class ImageTower(nn.Module):
    """A ViT (Dosovitskiy et al. 2020) over patches, mean-pooled; with regions, BriVL's image encoder: the
    whole-image vector and one vector per object box, a transformer over them, a masked mean."""

    def __init__(self, c: BriVLConfig):
        super().__init__()
        self.config = c
        n_patches = (c.image_size // c.patch_size) ** 2
        self.patch_emb = nn.Linear(3 * c.patch_size ** 2, c.d_model)  # flattened patch -> vector
        self.pos_emb = nn.Parameter(torch.randn(n_patches, c.d_model) * 0.02)  # learned, one per patch
        self.blocks = nn.ModuleList(vit_block(c) for _ in range(c.n_layer))
        self.ln_f = nn.LayerNorm(c.d_model)
        if c.regions:
            self.box_emb = nn.Linear(4, c.d_model)  # where the box is: (x0, y0, x1, y1) -> vector
            self.region_blocks = nn.ModuleList(vit_block(c) for _ in range(c.n_region_layer))
            self.region_ln = nn.LayerNorm(c.d_model)
        self.proj = nn.Sequential(nn.Linear(c.d_model, c.d_model), nn.GELU(), nn.Linear(c.d_model, c.embed_dim))

    def forward(self, images, boxes=None, box_mask=None) -> torch.Tensor:
        """images (B, 3, H, W); boxes (B, R, 4) fractions, box_mask (B, R) True = a real box -> (B, D) unit norm."""
        c, p = self.config, self.config.patch_size
        if images.shape[1:] != (3, c.image_size, c.image_size):
            raise ValueError(f"images: expected (B, 3, {c.image_size}, {c.image_size}) (model.image_size), "
                             f"got {tuple(images.shape)}")
        x = rearrange(images, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=p, p2=p)  # (B, N, 3 p^2)
        x = self.patch_emb(x) + self.pos_emb  # (B, N, C)
        for block in self.blocks:
            x, _, _ = block(x)
        x = self.ln_f(x)
        pooled = x.mean(1)  # (B, C) the whole image
        if c.regions:
            if boxes is None or box_mask is None:
                raise ValueError("boxes: model.regions=true needs boxes (B, R, 4) and box_mask (B, R) in the batch")
            fmap = rearrange(x, "b (h w) c -> b c h w", h=c.image_size // p)  # (B, C, h, w)
            regions = crop_regions(fmap, boxes, c.region_grid) + self.box_emb(boxes)  # (B, R, C)
            tokens = torch.cat([pooled[:, None], regions], dim=1)  # (B, 1 + R, C)
            real = torch.cat([torch.ones_like(box_mask[:, :1]), box_mask], dim=1).bool()  # (B, 1 + R)
            for block in self.region_blocks:
                tokens, _, _ = block(tokens, padding_mask=real)
            pooled = masked_mean(self.region_ln(tokens), real)  # (B, C)
        return F.normalize(self.proj(pooled).float(), dim=-1)


class TextTower(nn.Module):
    """BERT's encoder (models/bert.py, head none), masked mean over the tokens, MLP projection."""

    def __init__(self, c: BriVLConfig):
        super().__init__()
        self.bert = BERT(dataclasses.replace(c.text, vocab_size=c.vocab_size))
        width = c.text.d_model
        self.proj = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, c.embed_dim))

    def forward(self, input_ids, padding_mask) -> torch.Tensor:
        """input_ids (B, T), padding_mask (B, T) 1 = real token -> (B, D) unit norm."""
        h = self.bert(input_ids, padding_mask=padding_mask).hidden_states  # (B, T, C)
        return F.normalize(self.proj(masked_mean(h, padding_mask)).float(), dim=-1)


# --------------------------------------------------------------------------- the model


class BriVL(nn.Module, TrainedModel):
    def __init__(self, config: BriVLConfig):
        super().__init__()
        config.validate()  # (the text tower's BERT insists on model.vocab_size)
        self.config = c = config
        self.image = ImageTower(c)
        self.image.apply(normal_init)  # N(0, 0.02) matrices, zero biases
        self.text = TextTower(c)
        # s = 1/tau, stored as log(1/tau) (CLIP) so it stays positive; a buffer when it is not learned.
        # Shape (1,), not a scalar: FSDP2 shards parameters along their first dimension.
        log_scale = torch.tensor([math.log(1 / c.contrastive.temperature)])
        if c.contrastive.learn_temperature:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale)
        if c.contrastive.kind == "momentum_queue":
            self.image_m, self.text_m = copy.deepcopy(self.image), copy.deepcopy(self.text)  # the key towers
            for p in [*self.image_m.parameters(), *self.text_m.parameters()]:
                p.requires_grad = False
            K = c.contrastive.queue_size
            self.register_buffer("image_queue", torch.zeros(K, c.embed_dim))  # (K, D) past image keys
            self.register_buffer("text_queue", torch.zeros(K, c.embed_dim))  # (K, D) past text keys
            self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))  # next slot to write
            self.register_buffer("queue_filled", torch.zeros((), dtype=torch.long))  # slots holding keys, <= K
            self.register_buffer("momentum_steps", torch.zeros((), dtype=torch.long))  # updates done

    def pretrained_parts(self) -> dict[str, str | None]:
        """Submodules the run starts from a pretraining run (minimodels/train/run.py): the text tower's BERT
        from model.text.init_from, e.g. runs/bert (then data.tokenizer: runs/bert/tokenizer.json)."""
        return {"text.bert": self.config.text.init_from}

    def embed_images(self, images, boxes=None, box_mask=None) -> torch.Tensor:
        return self.image(images, boxes, box_mask)  # (B, D)

    def embed_texts(self, input_ids, padding_mask) -> torch.Tensor:
        return self.text(input_ids, padding_mask)  # (B, D)

    def forward(self, images, input_ids, padding_mask, boxes=None, box_mask=None) -> BriVLOutput:
        """A batch of B paired images and captions (see embed_images / embed_texts for the shapes). In
        training mode under torchrun, this process's slice of the global batch (see the module docstring);
        with momentum_queue this also enqueues the global batch's keys."""
        if len(images) != len(input_ids):
            raise ValueError(f"images and input_ids: {len(images)} images but {len(input_ids)} captions")
        v = self.embed_images(images, boxes, box_mask)  # (B, D)
        t = self.embed_texts(input_ids, padding_mask)  # (B, D)
        scale = self.log_scale.exp().clamp(max=100).squeeze(0)  # 1/tau, at most 100 (CLIP); 0-d
        if not self.training:  # evaluation: every process sees the whole batch, no gathering, no queue
            loss_i2t, loss_t2i = contrastive_loss(v, t, v, t, scale)
        elif self.config.contrastive.kind == "momentum_queue":
            if self.momentum_steps == 0:  # the first update, a copy, before the first keys
                self.momentum_update()
            with torch.no_grad():
                v_k = all_gather_no_grad(self.image_m(images, boxes, box_mask))  # (W*B, D) keys of the global batch
                t_k = all_gather_no_grad(self.text_m(input_ids, padding_mask))  # (W*B, D)
            n = int(self.queue_filled)
            image_keys = torch.cat([v_k, self.image_queue[:n]])  # (W*B + n, D): the batch's keys, then the queue
            text_keys = torch.cat([t_k, self.text_queue[:n]])  # (W*B + n, D)
            loss_i2t, loss_t2i = contrastive_loss(v, t, image_keys, text_keys, scale, rank_and_size()[0] * len(v))
            self.push(v_k, t_k)  # after the loss: this batch's keys are negatives for the next batches
        else:
            v_all, t_all = all_gather_with_grad(v), all_gather_with_grad(t)  # (W*B, D) the global batch
            loss_i2t, loss_t2i = contrastive_loss(v, t, v_all, t_all, scale, rank_and_size()[0] * len(v))
        loss = (loss_i2t + loss_t2i) / 2
        metrics = {"loss_i2t": loss_i2t.detach(), "loss_t2i": loss_t2i.detach(), "logit_scale": scale.detach()}
        return BriVLOutput(loss=loss, image_embeds=v, text_embeds=t, metrics=metrics)

    def after_optimizer_step(self) -> None:
        """momentum_queue: the key towers follow the query towers the optimizer just updated (MoCo, ALBEF),
        once per optimizer step whatever train.grad_accum is. inbatch: nothing."""
        if self.config.contrastive.kind == "momentum_queue":
            self.momentum_update()

    @torch.no_grad()
    def momentum_update(self) -> None:
        """theta_k <- m theta_k + (1 - m) theta_q for every parameter of the key towers. The first update
        uses m = 0, a copy, so that weights loaded into the query towers after construction (model.text.init_from)
        reach the key towers too."""
        m = self.config.contrastive.momentum if self.momentum_steps > 0 else 0.0
        query = [*self.image.parameters(), *self.text.parameters()]
        keys = [*self.image_m.parameters(), *self.text_m.parameters()]
        for q, k in zip(query, keys):
            k.mul_(m).add_(q.detach(), alpha=1 - m)
        self.momentum_steps += 1

    @torch.no_grad()
    def push(self, image_keys: torch.Tensor, text_keys: torch.Tensor) -> None:
        """Enqueue a batch of keys (B, D) into both queues."""
        K = len(self.image_queue)
        if K == 0:
            return
        enqueue(self.text_queue, int(self.queue_ptr), text_keys)
        self.queue_ptr.fill_(enqueue(self.image_queue, int(self.queue_ptr), image_keys))
        self.queue_filled.fill_(min(K, int(self.queue_filled) + len(image_keys)))

"""VQ-VAE (van den Oord et al. 2017), the image tokenizer of CogView (Ding et al. 2021).

CogView writes an image as a grid of discrete tokens that a GPT predicts after the caption's tokens. The
tokenizer is a convolutional autoencoder with a discrete bottleneck:

    z_e = E(x)                        (B, D, h, w)   strided convolutions: 32 x 32 pixels -> an 8 x 8 grid
    k = argmin_j ||z_e - e_j||^2      (B, h, w)      the nearest of the K codebook vectors e_j: the token ids
    z_q = e_k                         (B, D, h, w)
    x^ = G(z_q)                       (B, 3, H, W)   transposed convolutions back to pixels

The argmin has no gradient. The straight-through estimator runs the forward pass with z_q and the backward pass
as if the quantizer were the identity, so the encoder gets the decoder's gradient with respect to z_q:

    z_q = z_e + sg[e_k - z_e]         sg = stop gradient (detach)

The paper trains with  L = ||x - x^||^2 + ||sg[z_e] - e_k||^2 + beta ||z_e - sg[e_k]||^2
(reconstruction, codebook, commitment; beta = 0.25). Like CogView's released tokenizer we learn the codebook
instead with exponential moving averages, the paper's alternative to the codebook term (a running k-means,
decay gamma = 0.99):

    N_j <- gamma N_j + (1 - gamma) n_j                      n_j: the batch's latents whose nearest code is j
    m_j <- gamma m_j + (1 - gamma) sum_{i: k_i = j} z_e,i
    e_j  = m_j / N_j                                        N_j Laplace-smoothed: never a division by 0

and the loss keeps reconstruction and commitment:  L = ||x - x^||^2 + beta ||z_e - sg[e_k]||^2  (both means).
Why EMA: each code moves to the mean of its latents at a rate set by gamma alone. As parameters under the codebook
loss, the codes would follow the trainer's learning rate schedule and AdamW's weight decay would pull every code
towards 0; as buffers the optimizer never sees them.

Codes that no latent picks never move: they die (configs/vqvae.yaml with restart_below 0: 88% of the 256 codes
unused on the gallery after 300 steps, perplexity 7.8; with restarts 2.7% and 24.4, none by step 1500). A dead
code restarts: once its N_j falls below model.restart_below it moves onto the latent the codebook fits worst, as
if it had picked that one latent (N_j = 1, m_j = z). Jukebox (Dhariwal et al. 2020) restarts on random latents; the
worst-fit ones do not depend on the order of the batch's rows (see `Codebook.restart`).

The update depends on the batch as a whole. A forward pass in training mode only adds its n_j and latent sums to
the pending statistics; `after_optimizer_step` (called by the trainer once per optimizer step) sums them over
processes (all_reduce) and applies the update. So train.grad_accum = k micro-batches of B train like one batch of
k*B (every micro-batch is quantized with the same codebook, the update sees all k*B latents), and W processes x
batch B like one process x batch W*B.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from minimodels.nn import all_gather_no_grad, rank_and_size
from minimodels.protocols import TrainedModel


@dataclass
class VQVAEConfig:
    arch: str = "vqvae"  # selects this model in configs
    image_size: int = 32  # images are image_size x image_size RGB, pixels in [-1, 1]
    downsample: int = 4  # the token grid is image_size / downsample a side (32 -> 8 x 8): one stride-2 conv per halving
    channels: int = 64  # width of the convolutions
    n_res_block: int = 2  # residual blocks at the grid's resolution, in the encoder and in the decoder
    codebook_size: int = 256  # K, the image vocabulary (CogView: 8192)
    code_dim: int = 32  # D, the width of a latent and of a codebook vector (CogView: 256)
    beta: float = 0.25  # weight of the commitment loss (van den Oord et al.: 0.25)
    decay: float = 0.99  # gamma of the EMA codebook update (CogView: 0.99)
    eps: float = 1e-5  # Laplace smoothing of the EMA cluster sizes N_j
    restart_below: float = 0.5  # a code whose N_j falls below this restarts on the worst-fit latent; 0 = never
    init_from: str | None = None  # a run folder (runs/vqvae) whose latest weights this model starts from

    def validate(self) -> None:
        for name in ("image_size", "channels", "codebook_size", "code_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name}: must be positive, got {getattr(self, name)}")
        if self.downsample < 2 or self.downsample & (self.downsample - 1):
            raise ValueError(f"model.downsample: must be a power of 2, at least 2, got {self.downsample}")
        if self.image_size % self.downsample:
            raise ValueError(f"model.image_size: {self.image_size} is not divisible by model.downsample={self.downsample}")
        if self.n_res_block < 0:
            raise ValueError(f"model.n_res_block: must be >= 0, got {self.n_res_block}")
        if not 0 <= self.decay < 1:
            raise ValueError(f"model.decay: must be in [0, 1), got {self.decay}")
        for name in ("beta", "restart_below"):
            if getattr(self, name) < 0:
                raise ValueError(f"model.{name}: must be >= 0, got {getattr(self, name)}")
        if self.eps <= 0:
            raise ValueError(f"model.eps: must be positive, got {self.eps}")


@dataclass
class VQVAEOutput:
    loss: torch.Tensor  # reconstruction MSE + beta * commitment
    reconstructions: torch.Tensor  # (B, 3, H, W) x^, pixels in about [-1, 1] (not clamped)
    ids: torch.Tensor  # (B, h, w) token ids
    metrics: dict[str, torch.Tensor] | None = None  # mse, psnr, commitment, perplexity, dead_codes of the batch (logged)


# --------------------------------------------------------------------------- metrics


def psnr(mse: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB of pixels in [-1, 1] (peak-to-peak 2): 10 log10(2^2 / MSE)."""
    return 10 * torch.log10(4 / mse)


def codebook_usage(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """counts (K,): how often each code was picked -> (perplexity, dead share).
    perplexity = exp(-sum_j p_j log p_j), p_j = counts_j / sum(counts): K when every code is used equally often,
    1 when one code takes all; dead share: the fraction of the K codes never picked."""
    p = counts.float() / counts.sum()
    entropy = -(p * p.clamp(min=1e-30).log()).sum()  # a code never picked adds 0 log 0 = 0
    return entropy.exp(), (counts == 0).float().mean()


# --------------------------------------------------------------------------- blocks


class ResBlock(nn.Module):
    """x + Conv1x1(ReLU(Conv3x3(ReLU(x)))), at the grid's resolution (as in CogView's tokenizer)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Sequential(nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(channels, channels, 1))

    def forward(self, x):
        return x + self.conv(x)


def encoder(c: VQVAEConfig) -> nn.Sequential:
    """(B, 3, H, W) -> (B, D, H / downsample, W / downsample): stride-2 4x4 convolutions, each halving the side."""
    layers, width = [], 3
    for _ in range(int(math.log2(c.downsample))):
        layers += [nn.Conv2d(width, c.channels, 4, stride=2, padding=1), nn.ReLU()]
        width = c.channels
    layers += [nn.Conv2d(c.channels, c.channels, 3, padding=1), *(ResBlock(c.channels) for _ in range(c.n_res_block))]
    return nn.Sequential(*layers, nn.ReLU(), nn.Conv2d(c.channels, c.code_dim, 1))


def decoder(c: VQVAEConfig) -> nn.Sequential:
    """(B, D, h, w) -> (B, 3, h * downsample, w * downsample): the encoder mirrored, with transposed convolutions."""
    layers = [nn.Conv2d(c.code_dim, c.channels, 3, padding=1), *(ResBlock(c.channels) for _ in range(c.n_res_block))]
    for _ in range(int(math.log2(c.downsample)) - 1):
        layers += [nn.ReLU(), nn.ConvTranspose2d(c.channels, c.channels, 4, stride=2, padding=1)]
    return nn.Sequential(*layers, nn.ReLU(), nn.ConvTranspose2d(c.channels, 3, 4, stride=2, padding=1))


class Codebook(nn.Module):
    """K vectors e_j of width D, learned by EMA (see the module docstring). All state is buffers: checkpoints
    hold it and the optimizer never sees it. `pending` holds the statistics of the forward passes since the
    last update, a plain attribute (DDP does not broadcast it, checkpoints never hold it: it is None after
    every optimizer step)."""

    def __init__(self, c: VQVAEConfig):
        super().__init__()
        self.decay, self.eps, self.restart_below = c.decay, c.eps, c.restart_below
        codes = torch.empty(c.codebook_size, c.code_dim)
        nn.init.xavier_uniform_(codes, gain=nn.init.calculate_gain("tanh"))  # small, like the encoder's first outputs
        self.register_buffer("codes", codes)  # (K, D) e_j
        self.register_buffer("cluster_size", torch.ones(c.codebook_size))  # (K,) N_j, as if each code had one latent
        self.register_buffer("code_sum", codes.clone())  # (K, D) m_j = e_j N_j: a code nobody picks stays put
        self.pending: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (n_j (K,), sums (K, D), latents (N, D))

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """z (N, D) -> (N,) argmin_j ||z - e_j||^2, expanded as ||z||^2 - 2 z.e_j + ||e_j||^2 (one matmul)."""
        e = self.codes
        distances = z.float().pow(2).sum(1, keepdim=True) - 2 * z.float() @ e.T + e.pow(2).sum(1)  # (N, K)
        return distances.argmin(1)

    def forward(self, z_e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z_e (B, D, h, w) -> (z_q with the straight-through gradient (B, D, h, w), ids (B, h, w), commitment loss).
        In training mode the batch's statistics are added to `pending`."""
        B, _, h, w = z_e.shape
        z = rearrange(z_e, "b d h w -> (b h w) d").float()  # (N, D), N = B h w; fp32 under autocast
        ids = self.nearest(z)  # (N,)
        e_k = self.codes[ids]  # (N, D)
        if self.training:
            self.accumulate(z.detach(), ids)
        commitment = F.mse_loss(z, e_k)  # ||z_e - sg[e_k]||^2: the codes are buffers, no gradient reaches them
        z_q = z + (e_k - z).detach()  # z_q = z_e + sg[e_k - z_e]: forward e_k, backward the identity
        return rearrange(z_q, "(b h w) d -> b d h w", b=B, h=h), ids.view(B, h, w), commitment

    @torch.no_grad()
    def accumulate(self, z: torch.Tensor, ids: torch.Tensor) -> None:
        """Add the batch's n_j = |{i: k_i = j}|, sum_{i: k_i = j} z_i and latents z (N, D) (ids (N,)) to `pending`."""
        counts = torch.bincount(ids, minlength=len(self.codes)).float()  # (K,)
        sums = torch.zeros_like(self.codes).index_add_(0, ids, z)  # (K, D)
        if self.pending is not None:
            counts, sums, z = counts + self.pending[0], sums + self.pending[1], torch.cat([self.pending[2], z])
        self.pending = (counts, sums, z)

    @torch.no_grad()
    def update(self) -> None:
        """The EMA step over the pending statistics of every process, then the restarts; nothing if there are none."""
        if self.pending is None:
            return
        counts, sums, latents = self.pending
        self.pending = None
        if rank_and_size()[1] > 1:  # the global batch's statistics, the same on every process
            dist.all_reduce(counts)
            dist.all_reduce(sums)
            latents = all_gather_no_grad(latents)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)  # N_j <- gamma N_j + (1 - gamma) n_j
        self.code_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)  # m_j <- gamma m_j + (1 - gamma) sum z
        n, K = self.cluster_size.sum(), len(self.codes)
        smoothed = (self.cluster_size + self.eps) / (n + K * self.eps) * n  # (K,) Laplace: > 0, same total n
        self.codes.copy_(self.code_sum / smoothed[:, None])  # e_j = m_j / N_j
        self.restart(latents)

    @torch.no_grad()
    def restart(self, latents: torch.Tensor) -> None:
        """Move the codes whose N_j < restart_below onto the latents (N, D) farthest from their nearest code, the
        worst fit first, each as if it had picked that latent alone. Which latents those are does not depend on
        their order, so micro-batches and processes restart the codes one big batch would."""
        dead = (self.cluster_size < self.restart_below).nonzero().flatten()  # (n_dead,)
        if len(dead) == 0:
            return
        errors = (latents - self.codes[self.nearest(latents)]).pow(2).sum(1)  # (N,) squared distance to the code
        worst = errors.topk(min(len(dead), len(latents))).indices  # the worst fit first
        dead = dead[:len(worst)]
        self.codes[dead] = self.code_sum[dead] = latents[worst]  # e_j = m_j = z
        self.cluster_size[dead] = 1.0  # N_j = 1


# --------------------------------------------------------------------------- the model


class VQVAE(nn.Module, TrainedModel):
    # the metric functions, for the image_reconstruction task to score the whole val split with (data never imports models)
    psnr = staticmethod(psnr)
    codebook_usage = staticmethod(codebook_usage)

    def __init__(self, config: VQVAEConfig):
        super().__init__()
        config.validate()
        self.config = c = config
        self.encoder = encoder(c)
        self.codebook = Codebook(c)
        self.decoder = decoder(c)

    def check(self, images: torch.Tensor) -> None:
        c = self.config
        if images.shape[1:] != (3, c.image_size, c.image_size):
            raise ValueError(f"images: expected (B, 3, {c.image_size}, {c.image_size}) (model.image_size), "
                             f"got {tuple(images.shape)}")

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> token ids (B, h, w), h = H / downsample."""
        self.check(images)
        B, _, h, w = (z_e := self.encoder(images)).shape  # (B, D, h, w)
        return self.codebook.nearest(rearrange(z_e, "b d h w -> (b h w) d")).view(B, h, w)

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """token ids (B, h, w) -> images (B, 3, H, W), pixels in about [-1, 1]."""
        z_q = rearrange(self.codebook.codes[ids], "b h w d -> b d h w")  # (B, D, h, w)
        return self.decoder(z_q)

    def forward(self, images: torch.Tensor) -> VQVAEOutput:
        """images (B, 3, H, W) in [-1, 1]. L = ||x - x^||^2 + beta ||z_e - sg[e_k]||^2 (means over the elements)."""
        self.check(images)
        z_q, ids, commitment = self.codebook(self.encoder(images))
        x_hat = self.decoder(z_q)  # (B, 3, H, W)
        mse = F.mse_loss(x_hat.float(), images.float())
        loss = mse + self.config.beta * commitment
        counts = torch.bincount(ids.flatten(), minlength=self.config.codebook_size)
        perplexity, dead = codebook_usage(counts)
        metrics = {"mse": mse.detach(), "psnr": psnr(mse.detach()), "commitment": commitment.detach(),
                   "perplexity": perplexity, "dead_codes": dead}
        return VQVAEOutput(loss=loss, reconstructions=x_hat, ids=ids, metrics=metrics)

    def after_optimizer_step(self) -> None:
        """The EMA codebook update, over every micro-batch of the step on every process (module docstring)."""
        self.codebook.update()

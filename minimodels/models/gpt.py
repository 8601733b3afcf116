"""GPT: a decoder-only Transformer language model (Radford et al. 2018, 2019).

Read top to bottom: the config, the model (embeddings -> pre-LN blocks -> final norm -> tied LM head),
generation with a KV cache, and GPT-2 initialisation (`gpt2_init`, which GLM uses too).

    h_0 = W_e[x] + W_p[0..T-1]                  token + learned position embeddings
    h_l = Block(h_{l-1})  for l = 1..L          pre-LN, causal self-attention (minimodels/nn/block.py)
                                                with model.moe, some blocks' FFN is a mixture of experts
    P(x_{t+1} | x_<=t) = softmax(LN(h_L) W_e^T)  weight tying: the output layer is the embedding matrix
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from minimodels.moe import MoEConfig, Routing, add_moe_loss, build_block_ffn
from minimodels.nn import (LayerCache, MultiHeadAttention, PreLNBlock, build_ffn, check_block_options, cross_entropy,
                           normal_init, sample_next)
from minimodels.protocols import TrainedModel


@dataclass
class GPTConfig:
    arch: str = "gpt"  # selects this model in configs
    vocab_size: int | None = None  # null = size of the run's tokenizer
    block_size: int = 256  # longest context the model supports (number of learned positions)
    n_layer: int = 4  # transformer blocks
    n_head: int = 4  # attention heads per block
    d_model: int = 256  # model width
    d_ff: int | None = None  # feed-forward width; null = 4 * d_model
    ffn: str = "mlp"  # feed-forward kind, see minimodels/nn/feedforward.py FFN_KINDS
    activation: str = "gelu"  # gelu | gelu_tanh (GPT-2) | relu
    dropout: float = 0.0  # on embeddings, attention weights and residual branches
    bias: bool = True  # biases in Linear layers and LayerNorms (GPT-2: true)
    tie_weights: bool = True  # LM head shares the token embedding matrix
    attn_impl: str = "auto"  # auto | manual | sdpa (see minimodels/nn/attention.py)
    norm_eps: float = 1e-5  # LayerNorm epsilon
    init_from: str | None = None  # a run folder (runs/gpt) whose latest weights this model starts from
    moe: MoEConfig | None = None  # mixture-of-experts FFNs (Switch-GPT), see minimodels/moe/config.py; null = dense

    def validate(self) -> None:
        for name in ("block_size", "n_layer", "n_head", "d_model"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name}: must be positive, got {getattr(self, name)}")
        for name in ("vocab_size", "d_ff"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"model.{name}: must be positive or null, got {getattr(self, name)}")
        if self.d_model % self.n_head:
            raise ValueError(f"model.d_model: {self.d_model} is not divisible by model.n_head={self.n_head}")
        check_block_options(self)
        if self.moe is not None:
            self.moe.validate(causal=True)


@dataclass
class GPTOutput:
    logits: torch.Tensor  # (B, T, vocab_size)
    loss: torch.Tensor | None = None  # cross-entropy (nats) over predicted tokens (+ the MoE losses), with labels
    cache: list[LayerCache] | None = None  # when use_cache=True: one per block, keys and values of every position
    routings: list[Routing] | None = None  # with model.moe: the Routing of each MoE block, in block order
    metrics: dict[str, torch.Tensor] | None = None  # with model.moe: per-layer aux/z-loss, drops, load (logged)


class GPT(nn.Module, TrainedModel):
    def __init__(self, config: GPTConfig):
        super().__init__()
        if config.vocab_size is None:
            raise ValueError("model.vocab_size: must be set (the trainer fills it from the tokenizer)")
        config.validate()
        self.config = c = config
        d_ff = c.d_ff or 4 * c.d_model
        self.tok_emb = nn.Embedding(c.vocab_size, c.d_model)  # W_e
        self.pos_emb = nn.Embedding(c.block_size, c.d_model)  # W_p
        self.drop = nn.Dropout(c.dropout)
        norm = partial(nn.LayerNorm, c.d_model, eps=c.norm_eps, bias=c.bias)  # a new LayerNorm at each call
        self.blocks = nn.ModuleList()
        for i in range(c.n_layer):
            ffn = build_block_ffn(c.moe, i, c.d_model, d_ff, lambda width, experts=None: build_ffn(
                c.ffn, c.d_model, width, c.activation, c.dropout, c.bias, experts))  # dense, or with model.moe an MoE layer
            attn = MultiHeadAttention(c.d_model, c.n_head, bias=c.bias, dropout=c.dropout, causal=True, impl=c.attn_impl)
            self.blocks.append(PreLNBlock(attn, ffn, norm))
        self.ln_f = norm()
        self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        if c.tie_weights:
            self.lm_head.weight = self.tok_emb.weight
        gpt2_init(self, c.n_layer)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                cache: list[LayerCache] | None = None, use_cache: bool = False,
                inputs_embeds: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                dropless: bool = False) -> GPTOutput:
        """input_ids (B, T). labels (B, T) follow the Hugging Face convention: the model shifts them, so
        logits[:, t] are scored against labels[:, t + 1]; -100 marks positions without a target.
        inputs_embeds (B, T, C), if given, replaces the token embeddings W_e[input_ids] (P-tuning's prompts).
        cache: one LayerCache per block, the keys and values of the positions before input_ids (from an earlier
        call with use_cache=True, or P-tuning v2's prefixes); use_cache: return them with input_ids' added.
        position_ids (T,) or (B, T): the positions whose embeddings W_p are added; None = the tokens follow the
        cached ones (past .. past + T - 1). P-tuning v2 passes 0 .. T - 1: its cache holds prefixes, not tokens.
        dropless: MoE blocks route every token, whatever their capacity (generate does)."""
        B, T = input_ids.shape
        past = cache[0].length if cache else 0  # positions already in the cache
        if position_ids is None:
            if past + T > self.config.block_size:
                raise ValueError(f"sequence of {past + T} tokens is longer than "
                                 f"model.block_size={self.config.block_size}")
            position_ids = torch.arange(past, past + T, device=input_ids.device)  # (T,)
        elif int(position_ids.max()) >= self.config.block_size:
            raise ValueError(f"position_ids: reach {int(position_ids.max())}; model.block_size={self.config.block_size} "
                             f"learns positions 0..{self.config.block_size - 1}")
        tokens = self.tok_emb(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        x = self.drop(tokens + self.pos_emb(position_ids))  # (B, T, C)
        new_cache = [] if use_cache else None
        routings = {}  # name -> Routing of each MoE block
        for i, block in enumerate(self.blocks):
            x, layer_cache, routing = block(x, cache=cache[i] if cache else None, dropless=dropless)
            if use_cache:
                new_cache.append(layer_cache)
            if routing is not None:
                routings[f"moe_block{i}"] = routing
        logits = self.lm_head(self.ln_f(x))  # (B, T, V)
        loss = None
        if labels is not None:
            # L = -1/N sum_t log P(x_{t+1} | x_<=t): position t is scored against labels[:, t + 1].
            # Shifting the labels (not slicing the logits) avoids copying the (B, T, V) logits.
            targets = F.pad(labels[:, 1:], (0, 1), value=-100)  # (B, T); the last position has no target
            loss = cross_entropy(logits, targets)  # fp32 arithmetic, without an fp32 copy
        loss, metrics = add_moe_loss(self.config.moe, routings, loss)  # + the MoE layers' aux and z-losses
        return GPTOutput(logits=logits, loss=loss, cache=new_cache, routings=list(routings.values()) or None,
                         metrics=metrics)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, eos_token_id: int | None = None,
                 use_cache: bool = True, generator: torch.Generator | None = None,
                 token_range: tuple[int, int] | None = None) -> torch.Tensor:
        """Extend input_ids (B, T) by up to max_new_tokens tokens; returns (B, T + new).
        token_range (first, end): only ids first .. end - 1 can be drawn, the others' logits are masked (CogView
        writes image codes only: data/text_to_image.py).

        With the KV cache each step feeds only the newest token, while the context fits in block_size. Beyond,
        the window slides and every step re-encodes the last block_size tokens, as the uncached path does: the
        positions are learned and absolute, so after a slide every token sits at a new position and no cached
        key or value stays valid.
        MoE blocks route dropless: capacity = ceil(factor * T * k / E) counts the tokens of one forward pass,
        B in a cached step and B * T without the cache, so with capacity the two would drop different tokens."""
        if input_ids.size(1) > self.config.block_size:
            raise ValueError(f"prompt of {input_ids.size(1)} tokens is longer than model.block_size={self.config.block_size}")
        was_training = self.training
        self.eval()
        idx, cache = input_ids, None
        for _ in range(max_new_tokens):
            if cache is not None and idx.size(1) <= self.config.block_size:
                out = self(idx[:, -1:], cache=cache, use_cache=True, dropless=True)  # (B, 1, V)
            else:  # first step, or the window slid: encode the last block_size tokens
                out = self(idx[:, -self.config.block_size:], use_cache=use_cache, dropless=True)
            cache = out.cache
            logits = out.logits[:, -1, :]  # (B, V)
            if token_range is not None:  # -inf outside [first, end): never drawn, and top-k counts only the range
                outside = torch.ones(logits.shape[-1], dtype=torch.bool, device=logits.device)
                outside[token_range[0]:token_range[1]] = False
                logits = logits.masked_fill(outside, float("-inf"))
            next_id = sample_next(logits, temperature, top_k, top_p, generator)  # (B, 1)
            idx = torch.cat([idx, next_id], dim=1)
            if eos_token_id is not None and bool((next_id == eos_token_id).all()):
                break
        self.train(was_training)
        return idx

    def num_params(self, exclude_positions: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.pos_emb.weight.numel() if exclude_positions else n

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token, forward + backward (Kaplan et al. 2020 / PaLM appendix B):
        6 N for the weight matmuls (N = non-embedding params + LM head) + 12 L T d for attention scores."""
        c = self.config
        n = sum(p.numel() for n_, p in self.named_parameters() if p.dim() == 2 and "emb" not in n_ and "lm_head" not in n_)
        n += c.vocab_size * c.d_model  # the LM head matmul (tied or not)
        return 6 * n + 12 * c.n_layer * seq_len * c.d_model


def gpt2_init(model: nn.Module, n_layer: int) -> None:
    """GPT-2 initialisation (GLM uses it too): every matrix and embedding ~ N(0, 0.02^2), biases 0; then the
    residual-branch output projections ~ N(0, (0.02 / sqrt(N))^2), N = 2 residual adds per layer (section 2.3)."""
    model.apply(normal_init)
    for name, p in model.named_parameters():
        if name.endswith("proj.weight") and (".attn." in name or ".ffn." in name):  # experts: ffn.experts.N.proj
            nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

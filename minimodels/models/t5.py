"""T5: the Text-to-Text Transfer Transformer, an encoder-decoder (Raffel et al. 2019).

Read top to bottom: the config, one stack (encoder or decoder), the model (shared embedding -> encoder ->
decoder with cross-attention -> LM head), T5's initialisation, greedy / sampled decoding and beam search
with a KV cache (Hugging Face interop: minimodels/hf.py).

    h = Encoder(W_e[x])                      bidirectional self-attention, relative position bias
    s = Decoder(W_e[y_<t], h)                causal self-attention + cross-attention to h
    P(y_t | y_<t, x) = softmax(s W_out)      v1.0: W_out = W_e^T with s rescaled by d_model^-0.5; v1.1: its own matrix

Differences from the original Transformer (Raffel et al. section 2.1): no absolute positions (a learned
scalar bias per head and distance bucket is added to the attention scores instead), RMSNorm without a bias
in pre-LN blocks, no biases anywhere, and attention scores not divided by sqrt(d_head) (T5's
initialisation folds that factor into W_Q).

Two versions, chosen by three config fields:
    T5 v1.0 (the paper; the default here):  ffn: mlp,   activation: relu,      tie_weights: true
    T5 v1.1 (Raffel et al. released it later): ffn: gated, activation: gelu_tanh, tie_weights: false
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from minimodels.moe import MoEConfig, Routing, add_moe_loss, build_block_ffn
from minimodels.nn import (GatedMLP, LayerCache, MLP, MultiHeadAttention, PreLNBlock, RelativePositionBias, RMSNorm,
                           build_ffn, check_block_options, cross_entropy, sample_next)
from minimodels.protocols import TrainedModel


@dataclass
class T5Config:
    arch: str = "t5"  # selects this model in configs
    vocab_size: int | None = None  # null = size of the run's tokenizer (sentinels included)
    init_from: str | None = None  # a run folder (runs/t5) whose latest weights this model starts from
    d_model: int = 256  # model width
    n_layer: int = 4  # encoder blocks
    n_decoder_layer: int | None = None  # decoder blocks; null = n_layer
    n_head: int = 4  # attention heads per block
    d_head: int | None = None  # width of one head; null = d_model / n_head (T5's sizes use 64)
    d_ff: int = 1024  # feed-forward width
    ffn: str = "mlp"  # mlp (v1.0) | gated (v1.1), see minimodels/nn/feedforward.py
    activation: str = "relu"  # relu (v1.0) | gelu_tanh (v1.1 "gated-gelu") | gelu
    num_buckets: int = 32  # relative position buckets per stack (section 2.1)
    max_distance: int = 128  # distances beyond this share the last bucket
    dropout: float = 0.0  # on embeddings, attention weights, residual branches, stack outputs (T5: 0.1)
    tie_weights: bool = True  # v1.0: LM head = embedding (output rescaled by d_model^-0.5); v1.1: untied
    norm_eps: float = 1e-6  # RMSNorm epsilon
    attn_impl: str = "auto"  # auto | manual | sdpa (see minimodels/nn/attention.py)
    pad_token_id: int = 0  # padding id, also the decoder's start token (as in T5); our tokenizers put pad at 0
    moe: MoEConfig | None = None  # mixture-of-experts FFNs in both stacks (Switch-T5), see minimodels/moe/config.py

    def validate(self) -> None:
        for name in ("d_model", "n_layer", "n_head", "d_ff", "num_buckets", "max_distance"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name}: must be positive, got {getattr(self, name)}")
        for name in ("vocab_size", "n_decoder_layer", "d_head"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"model.{name}: must be positive or null, got {getattr(self, name)}")
        if self.d_head is None and self.d_model % self.n_head:
            raise ValueError(f"model.d_model: {self.d_model} is not divisible by model.n_head={self.n_head} (or set model.d_head)")
        if self.num_buckets < 4:
            raise ValueError(f"model.num_buckets: must be at least 4 (half exact, half log-spaced per direction), got {self.num_buckets}")
        if self.max_distance <= self.num_buckets // 2:  # the decoder's exact buckets reach num_buckets / 2
            raise ValueError(f"model.max_distance: must be larger than model.num_buckets / 2 = {self.num_buckets // 2}, "
                             f"where the log-spaced buckets start; got {self.max_distance}")
        if self.pad_token_id < 0:
            raise ValueError(f"model.pad_token_id: must be >= 0, got {self.pad_token_id}")
        check_block_options(self)
        if self.vocab_size is not None and not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(f"model.pad_token_id: {self.pad_token_id} is not an id of a vocabulary of {self.vocab_size}")
        if self.moe is not None:
            self.moe.validate(causal=True)  # the decoder is causal


@dataclass
class T5Output:
    logits: torch.Tensor  # (B, T_dec, vocab_size)
    loss: torch.Tensor | None = None  # mean cross-entropy (nats) over labels != -100, when labels are given
    encoder_hidden_states: torch.Tensor | None = None  # (B, S, d_model), the encoder output h
    cache: list[LayerCache] | None = None  # with use_cache: the decoder's, one per block (self- and cross-attention)
    routings: list[Routing] | None = None  # with model.moe: the Routing of each MoE block, encoder then decoder
    metrics: dict[str, torch.Tensor] | None = None  # with model.moe: per-layer aux/z-loss, drops, load (logged)


class T5Stack(nn.Module):
    """One side of T5: N pre-LN blocks with RMSNorm, one relative position bias table for all of them,
    and a final norm. The encoder is bidirectional; the decoder is causal and cross-attends to the encoder."""

    def __init__(self, c: T5Config, n_layer: int, decoder: bool):
        super().__init__()
        # section 2.1: "each layer shares the position embedding parameters" (HF keeps this table in the
        # first layer's attention; it is one table per stack either way)
        self.pos_bias = RelativePositionBias(c.n_head, bidirectional=not decoder, num_buckets=c.num_buckets,
                                             max_distance=c.max_distance)
        self.drop = nn.Dropout(c.dropout)
        norm = partial(RMSNorm, c.d_model, eps=c.norm_eps)  # a new RMSNorm at each call
        # no biases, and no 1/sqrt(d_head) (T5 folds it into the initialisation of W_Q)
        make_attention = partial(MultiHeadAttention, c.d_model, c.n_head, d_head=c.d_head, bias=False, dropout=c.dropout,
                            scaled=False, impl=c.attn_impl)
        self.blocks = nn.ModuleList()
        for i in range(n_layer):
            ffn = build_block_ffn(c.moe, i, c.d_model, c.d_ff, lambda width, experts=None: build_ffn(
                c.ffn, c.d_model, width, c.activation, c.dropout, False, experts))  # dense, or with model.moe an MoE layer
            attn = make_attention(causal=decoder)
            self.blocks.append(PreLNBlock(attn, ffn, norm, cross_attn=make_attention(cross=True) if decoder else None))
        self.name = "dec" if decoder else "enc"
        self.ln_f = norm()

    def forward(self, x, padding_mask=None, memory=None, memory_padding_mask=None, cache=None, use_cache=False,
                dropless=False):
        """x (B, T, C) embedded tokens. padding_mask (B, T) for the encoder; memory (B, S, C) and
        memory_padding_mask (B, S), the encoder's padding mask, for the decoder; cache the decoder's list of
        LayerCache; dropless: MoE blocks route every token, whatever their capacity. Returns ((B, T, C), the cache (with use_cache) or None, routings: name ->
        Routing of each MoE block)."""
        T = x.size(1)
        past = cache[0].length if cache else 0  # decoder tokens already in the cache
        # B[h, i, j] = b_h(bucket(j - i)), computed once and added to the scores of every layer
        position_bias = self.pos_bias(T, past + T, x.device)  # (1, nh, T, past + T)
        x = self.drop(x)
        new_cache = [] if use_cache else None
        routings = {}
        for i, block in enumerate(self.blocks):
            x, layer_cache, routing = block(x, padding_mask=padding_mask, position_bias=position_bias, memory=memory,
                                            memory_padding_mask=memory_padding_mask, cache=cache[i] if cache else None,
                                            dropless=dropless)
            if use_cache:
                new_cache.append(layer_cache)
            if routing is not None:
                routings[f"moe_{self.name}_block{i}"] = routing
        return self.drop(self.ln_f(x)), new_cache, routings


class T5(nn.Module, TrainedModel):
    def __init__(self, config: T5Config):
        super().__init__()
        if config.vocab_size is None:
            raise ValueError("model.vocab_size: must be set (the trainer fills it from the tokenizer)")
        config.validate()
        self.config = c = config
        self.tok_emb = nn.Embedding(c.vocab_size, c.d_model)  # W_e, shared by encoder, decoder (and the LM head in v1.0)
        self.encoder = T5Stack(c, c.n_layer, decoder=False)
        self.decoder = T5Stack(c, c.n_decoder_layer or c.n_layer, decoder=True)
        self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False)  # W_out
        if c.tie_weights:
            self.lm_head.weight = self.tok_emb.weight
        self._init_weights()

    # ------------------------------------------------------------------ initialisation
    @torch.no_grad()
    def _init_weights(self) -> None:
        """Mesh TensorFlow's initialisation, as in HF's T5 with initializer_factor 1.0: every matrix
        N(0, 1/fan_in), except W_Q, which also carries the 1/sqrt(d_head) that the unscaled attention leaves out."""
        c = self.config
        d_head = c.d_head or c.d_model // c.n_head
        inner = c.n_head * d_head
        nn.init.normal_(self.tok_emb.weight, std=1.0)
        if not c.tie_weights:
            nn.init.normal_(self.lm_head.weight, std=1.0)
        for m in self.modules():
            if isinstance(m, RelativePositionBias):
                nn.init.normal_(m.bias.weight, std=c.d_model**-0.5)
            elif isinstance(m, MultiHeadAttention):
                w_q = m.q.weight if m.cross else m.qkv.weight[:inner]  # (inner, C): the W_Q rows
                w_kv = m.kv.weight if m.cross else m.qkv.weight[inner:]  # (2 inner, C): W_K and W_V
                nn.init.normal_(w_q, std=(c.d_model * d_head) ** -0.5)
                nn.init.normal_(w_kv, std=c.d_model**-0.5)
                nn.init.normal_(m.proj.weight, std=inner**-0.5)
            elif isinstance(m, (MLP, GatedMLP)):
                for w in (m.fc, m.gate) if isinstance(m, GatedMLP) else (m.fc,):
                    nn.init.normal_(w.weight, std=c.d_model**-0.5)
                nn.init.normal_(m.proj.weight, std=c.d_ff**-0.5)

    # ------------------------------------------------------------------ forward
    def encode(self, input_ids: torch.Tensor, padding_mask: torch.Tensor | None = None,
               dropless: bool = False) -> tuple[torch.Tensor, dict[str, Routing]]:
        """input_ids (B, S), padding_mask (B, S) 1/True on real tokens -> encoder output h (B, S, C), and the
        routings of its MoE blocks (empty without model.moe; dropless: they route every token)."""
        mask = None if padding_mask is None else padding_mask.bool()
        h, _, routings = self.encoder(self.tok_emb(input_ids), padding_mask=mask, dropless=dropless)
        return h, routings

    def decode(self, decoder_input_ids: torch.Tensor, encoder_hidden_states: torch.Tensor,
               memory_padding_mask: torch.Tensor | None = None, cache: list[LayerCache] | None = None,
               use_cache: bool = False, dropless: bool = False) -> tuple[torch.Tensor, list[LayerCache] | None, dict[str, Routing]]:
        """decoder_input_ids (B, T) after the `cache`d ones; memory_padding_mask (B, S) 1/True on the encoder's real
        tokens; dropless: MoE blocks route every token. Returns logits (B, T, V), the updated cache (when
        use_cache) and the MoE blocks' routings."""
        mask = None if memory_padding_mask is None else memory_padding_mask.bool()  # (B, S)
        s, cache, routings = self.decoder(self.tok_emb(decoder_input_ids), memory=encoder_hidden_states,
                                          memory_padding_mask=mask, cache=cache, use_cache=use_cache, dropless=dropless)  # (B, T, C)
        if self.config.tie_weights:
            # Mesh TensorFlow: with the output layer tied to the (std 1) embedding, rescale by d_model^-0.5
            s = s * self.config.d_model**-0.5
        return self.lm_head(s), cache, routings  # (B, T, V)

    def shift_right(self, labels: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: the decoder reads the start token (pad) then labels[:-1]: y_t is predicted from y_<t."""
        start = torch.full_like(labels[:, :1], self.config.pad_token_id)  # (B, 1)
        shifted = torch.cat([start, labels[:, :-1]], dim=1)  # (B, T)
        return shifted.masked_fill(shifted == -100, self.config.pad_token_id)  # ignored labels are read as pad

    def forward(self, input_ids: torch.Tensor | None = None, padding_mask: torch.Tensor | None = None,
                decoder_input_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                encoder_hidden_states: torch.Tensor | None = None, cache: list[LayerCache] | None = None,
                use_cache: bool = False) -> T5Output:
        """input_ids (B, S) and padding_mask (B, S) for the encoder (or its output `encoder_hidden_states`).
        labels (B, T) are the target tokens, -100 where there is nothing to predict; unlike GPT, position t
        of the logits is scored against labels[:, t], since the decoder input is already shifted right."""
        routings = {}  # name -> Routing of each MoE block
        if encoder_hidden_states is None:
            if input_ids is None:
                raise ValueError("T5.forward: pass input_ids (B, S) or encoder_hidden_states (B, S, d_model)")
            encoder_hidden_states, routings = self.encode(input_ids, padding_mask)
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("T5.forward: pass decoder_input_ids (B, T) or labels (B, T)")
            decoder_input_ids = self.shift_right(labels)
        logits, cache, decoder_routings = self.decode(decoder_input_ids, encoder_hidden_states, padding_mask,
                                                      cache, use_cache)
        routings.update(decoder_routings)
        loss = None
        if labels is not None:
            # L = -1/N sum_t log P(y_t | y_<t, x) over the N labels != -100
            loss = cross_entropy(logits, labels)
        loss, metrics = add_moe_loss(self.config.moe, routings, loss)  # + the MoE layers' aux and z-losses
        return T5Output(logits=logits, loss=loss, encoder_hidden_states=encoder_hidden_states, cache=cache,
                        routings=list(routings.values()) or None, metrics=metrics)

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, padding_mask: torch.Tensor | None = None, max_new_tokens: int = 32,
                 num_beams: int = 1, eos_token_id: int | None = None, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, length_penalty: float = 1.0,
                 use_cache: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
        """Decode up to max_new_tokens for each input (B, S). Returns (B, 1 + n): the start token (pad), then
        the output; after eos a sequence is filled with pad (as Hugging Face's generate does).

        num_beams > 1: beam search (see `beam_search`). Otherwise one token per step from `sample_next`:
        temperature 0 (the default) is greedy decoding, > 0 samples (with top_k / top_p). The encoder runs
        once; with the cache each step feeds the decoder only the newest token. MoE blocks route dropless, as
        in GPT's generate: capacity counts the tokens of one forward pass (B in a cached step), so any capacity
        would make the cached and the uncached decoding differ."""
        if num_beams > 1:
            return self.beam_search(input_ids, padding_mask, max_new_tokens, num_beams, eos_token_id, length_penalty)
        was_training = self.training
        self.eval()
        memory, _ = self.encode(input_ids, padding_mask, dropless=True)  # (B, S, C)
        out = torch.full((input_ids.size(0), 1), self.config.pad_token_id, dtype=torch.long, device=input_ids.device)
        done = torch.zeros(input_ids.size(0), dtype=torch.bool, device=input_ids.device)  # (B,) produced eos
        cache = None
        for _ in range(max_new_tokens):
            step_ids = out if cache is None else out[:, -1:]  # the whole prefix once, then only the newest token
            logits, cache, _ = self.decode(step_ids, memory, padding_mask, cache, use_cache, dropless=True)
            next_id = sample_next(logits[:, -1, :], temperature, top_k, top_p, generator)  # (B, 1)
            if eos_token_id is not None:
                next_id = next_id.masked_fill(done[:, None], self.config.pad_token_id)
                done |= next_id[:, 0] == eos_token_id
            out = torch.cat([out, next_id], dim=1)
            if bool(done.all()):
                break
        self.train(was_training)
        return out

    @torch.no_grad()
    def beam_search(self, input_ids: torch.Tensor, padding_mask: torch.Tensor | None = None, max_new_tokens: int = 32,
                    num_beams: int = 4, eos_token_id: int | None = None, length_penalty: float = 1.0) -> torch.Tensor:
        """Beam search: keep the num_beams highest-scoring outputs per input, score = sum of log P(y_t | y_<t, x).
        A beam that has produced eos is finished: it keeps its score and continues with pad at no cost.
        Stops when every beam is finished or after max_new_tokens; returns (B, 1 + n), for each input the
        beam with the best score / length^length_penalty (length = generated tokens, eos included)."""
        was_training = self.training
        self.eval()
        B, k, pad = input_ids.size(0), num_beams, self.config.pad_token_id
        memory = self.encode(input_ids, padding_mask, dropless=True)[0].repeat_interleave(k, dim=0)  # (B*k, S, C), once
        mask = None if padding_mask is None else padding_mask.repeat_interleave(k, dim=0)  # (B*k, S)
        seqs = torch.full((B * k, 1), pad, dtype=torch.long, device=input_ids.device)  # (B*k, 1)
        scores = torch.zeros(B, k, device=input_ids.device)
        scores[:, 1:] = float("-inf")  # all beams start as the same empty output: expand only the first
        done = torch.zeros(B * k, dtype=torch.bool, device=input_ids.device)
        lengths = torch.zeros(B * k, device=input_ids.device)
        cache = None
        for _ in range(max_new_tokens):
            logits, cache, _ = self.decode(seqs if cache is None else seqs[:, -1:], memory, mask, cache, use_cache=True,
                                           dropless=True)  # MoE blocks: dropless, as in generate
            logp = F.log_softmax(logits[:, -1, :].float(), dim=-1)  # (B*k, V)
            V = logp.size(-1)
            logp[done] = float("-inf")  # a finished beam can only be continued by pad, at log-prob 0
            logp[done, pad] = 0.0
            candidates = (scores.reshape(B * k, 1) + logp).reshape(B, k * V)  # every beam x every next token
            scores, best = candidates.topk(k, dim=-1)  # (B, k)
            source = (best // V + torch.arange(B, device=best.device)[:, None] * k).flatten()  # (B*k,) rows extended
            token = (best % V).flatten()  # (B*k,)
            seqs = torch.cat([seqs[source], token[:, None]], dim=1)  # (B*k, t + 1)
            lengths = lengths[source] + (~done[source]).float()
            done = done[source] | (token == eos_token_id if eos_token_id is not None else torch.zeros_like(done))
            cache = [layer.select(source) for layer in cache]  # the cache follows its beam
            if bool(done.all()):
                break
        final = scores / lengths.clamp(min=1).reshape(B, k) ** length_penalty  # (B, k)
        pick = final.argmax(dim=-1) + torch.arange(B, device=final.device) * k  # (B,)
        self.train(was_training)
        return seqs[pick]

    # ------------------------------------------------------------------ helpers
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # tied weights are counted once

"""GLM: General Language Model pretraining with autoregressive blank infilling (Du et al. 2021).

One Transformer reads a text with blanks bidirectionally (like BERT) and writes what fills each blank
autoregressively (like GPT), so it does not need to be told how long a blank is. The data side
(minimodels/data/blank_infilling.py) cuts a text x1..x6 with blanks {x3} and {x5, x6} into

    Part A  x1 x2 [M] x4 [M]                      the text, each span replaced by one mask token
    Part B  [S] x5 x6 [S] x3                      the spans in shuffled order, each after a start token [sop]
    targets             x5 x6 [E] x3 [E]          each span followed by [eop]; the loss covers Part B only

and this file is the model that reads [Part A; Part B] as one sequence (section 2.2):

    attention   Part A tokens attend to all of Part A (bidirectional) and never to Part B;
                Part B tokens attend to all of Part A and causally to Part B (earlier spans included)
    positions   h_0 = E_tok[x] + E_pos1[p1] + E_pos2[p2]     2D positional encoding (section 2.2.2):
                p1 = position in Part A (a Part B token takes its [MASK]'s position),
                p2 = 0 in Part A, 1..len + 1 inside a span ([sop] is 1)
    blocks      h_l = Block(h_{l-1})  pre-LN, GELU (section 2.3: "rearranged" layer norm, as Megatron-LM)
    output      P(token) = softmax(LN(h_L) E_tok^T)           tied to the token embedding

Fine-tuning for classification (section 2.3) keeps this model as it is: the input becomes a cloze c(x) with
one [MASK], the label y a verbalizer v(y) to write into it, and

    score(y) = log p(v(y) | c(x)) = sum_k log P(v(y)_k | c(x), [sop] v(y)_<k)   (the fill v(y) then [eop])
    p(y | x) = softmax over y of score(y)                                      the loss: its cross-entropy

All classes are scored in one pass: Part B holds one segment [sop] v(y) per class, and `segment_ids` keep each
segment from seeing the others (data/package_classification.py PackageClozeTask makes such batches).

Read top to bottom: the config, the attention mask, the model (initialised as GPT-2, `gpt2_init`), and
generation (filling the blanks one after another with a KV cache). The mask kinds [MASK] / [sMASK] / [gMASK] differ only in how
the data picks spans; the model treats them alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from minimodels.models.gpt import gpt2_init
from minimodels.nn import (LayerCache, MultiHeadAttention, PreLNBlock, build_ffn, check_block_options, cross_entropy,
                           pad_rows, sample_next)
from minimodels.protocols import TrainedModel


@dataclass
class GLMConfig:
    arch: str = "glm"  # selects this model in configs
    vocab_size: int | None = None  # null = size of the run's tokenizer (with the mask, [sop] and [eop] tokens)
    block_size: int = 128  # longest Part A (learned positions p1) and longest span (p2 up to block_size + 1)
    n_layer: int = 4  # transformer blocks
    n_head: int = 4  # attention heads per block
    d_model: int = 256  # model width
    d_ff: int | None = None  # feed-forward width; null = 4 * d_model
    ffn: str = "mlp"  # feed-forward kind, see minimodels/nn/feedforward.py FFN_KINDS
    activation: str = "gelu"  # gelu | gelu_tanh | relu
    dropout: float = 0.0  # on embeddings, attention weights and residual branches
    bias: bool = True  # biases in Linear layers and LayerNorms
    attn_impl: str = "auto"  # auto | manual | sdpa (see minimodels/nn/attention.py)
    norm_eps: float = 1e-5  # LayerNorm epsilon
    init_from: str | None = None  # a run folder whose latest weights this model starts from

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


@dataclass
class GLMOutput:
    logits: torch.Tensor | None  # (B, T, vocab_size), logits[:, t] scores labels[:, t] (no shift); None: labels, no cloze
    masked_logits: torch.Tensor | None = None  # with labels (no cloze): (N, vocab_size) at the N Part B targets, as BERT's
    loss: torch.Tensor | None = None  # cross-entropy (nats) over the Part B targets (a cloze: over the classes)
    class_scores: torch.Tensor | None = None  # (B, C) a cloze's score(c) = log P(v(c) fills the blank), with segment_ids
    cache: list[LayerCache] | None = None  # when use_cache=True: one per block, keys and values of every position
    metrics: dict[str, torch.Tensor] | None = None  # none: nothing to log beyond the loss


def glm_attn_mask(part_a_len: torch.Tensor, t_q: int, t_k: int, segment_ids: torch.Tensor | None = None) -> torch.Tensor:
    """(B, t_q, t_k) bool, True where a query may attend a key. Every query sees all of Part A (keys before
    part_a_len) and every key up to itself: Part A is bidirectional, Part B causal over itself, and Part A
    never sees Part B (a Part A query's "up to itself" stays inside Part A). As in `causal_mask`, the queries
    are the last t_q of t_k positions (the first t_k - t_q are in a KV cache). Right padding at the end of
    the sequence is harmless: only padding queries, whose outputs are not scored, can reach a padding key.
    segment_ids (B, t_k), for a cloze: a Part B query sees only the Part B keys of its own segment."""
    key = torch.arange(t_k, device=part_a_len.device)  # (Tk,)
    query = torch.arange(t_k - t_q, t_k, device=part_a_len.device)  # (Tq,) absolute positions
    causal = (key[None, :] <= query[:, None])[None]  # (1, Tq, Tk)
    if segment_ids is not None:
        causal = causal & (segment_ids[:, t_k - t_q:, None] == segment_ids[:, None, :])  # (B, Tq, Tk)
    return causal | (key[None, None, :] < part_a_len[:, None, None])  # (B, Tq, Tk)


class GLM(nn.Module, TrainedModel):
    def __init__(self, config: GLMConfig):
        super().__init__()
        if config.vocab_size is None:
            raise ValueError("model.vocab_size: must be set (the trainer fills it from the tokenizer)")
        config.validate()
        self.config = c = config
        d_ff = c.d_ff or 4 * c.d_model
        self.tok_emb = nn.Embedding(c.vocab_size, c.d_model)  # E_tok
        self.pos_emb = nn.Embedding(c.block_size, c.d_model)  # E_pos1: position in Part A
        self.block_pos_emb = nn.Embedding(c.block_size + 2, c.d_model)  # E_pos2: 0 in Part A, 1..len + 1 in a span
        self.drop = nn.Dropout(c.dropout)
        # causal=False: the mask comes from glm_attn_mask, half bidirectional and half causal
        norm = partial(nn.LayerNorm, c.d_model, eps=c.norm_eps, bias=c.bias)  # a new LayerNorm at each call
        self.blocks = nn.ModuleList()
        for _ in range(c.n_layer):
            ffn = build_ffn(c.ffn, c.d_model, d_ff, c.activation, c.dropout, c.bias)
            attn = MultiHeadAttention(c.d_model, c.n_head, bias=c.bias, dropout=c.dropout, causal=False, impl=c.attn_impl)
            self.blocks.append(PreLNBlock(attn, ffn, norm))
        self.ln_f = norm()
        self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight  # tied: scores against the token embeddings
        gpt2_init(self, c.n_layer)  # N(0, 0.02^2), residual output projections scaled by 1/sqrt(2 n_layer)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, block_position_ids: torch.Tensor,
                part_a_len: torch.Tensor, labels: torch.Tensor | None = None,
                segment_ids: torch.Tensor | None = None, class_labels: torch.Tensor | None = None,
                cache: list[LayerCache] | None = None, use_cache: bool = False) -> GLMOutput:
        """input_ids (B, T) = [Part A; Part B] (right-padded); position_ids and block_position_ids (B, T) the two
        position ids; part_a_len (B,) the length of each row's Part A. labels (B, T): the token each position
        must predict (no shift: the data already put span + [eop] under [sop] + span), -100 in Part A and padding;
        with labels (and no cloze) the output scores only those positions (`masked_logits`, `logits` None), as BERT's.
        A cloze (module docstring) adds segment_ids (B, T): 0 in Part A and padding, c + 1 in the segment
        [sop] v(c) of class c (labels: v(c) [eop]); the output then has class_scores (B, C), and with
        class_labels (B,) the loss is their cross-entropy. With a cache (one LayerCache per block), input_ids are
        the newest tokens after the cached ones (generation); use_cache: return the cache with them added."""
        T = input_ids.size(1)
        c = self.config
        p1_max, p2_max = int(position_ids.max()), int(block_position_ids.max())
        if p1_max >= c.block_size or p2_max > c.block_size + 1:
            raise ValueError(f"position ids reach {p1_max} (Part A) and {p2_max} (in a span); model.block_size="
                             f"{c.block_size} allows at most {c.block_size - 1} and {c.block_size + 1}")
        past = cache[0].length if cache else 0  # tokens already in the cache
        # h_0 = E_tok[x] + E_pos1[p1] + E_pos2[p2]
        x = self.tok_emb(input_ids) + self.pos_emb(position_ids) + self.block_pos_emb(block_position_ids)  # (B, T, C)
        x = self.drop(x)
        mask = glm_attn_mask(part_a_len, T, past + T, segment_ids)  # (B, T, past + T)
        new_cache = [] if use_cache else None
        for i, block in enumerate(self.blocks):
            x, layer_cache, _ = block(x, attn_mask=mask, cache=cache[i] if cache else None)
            if use_cache:
                new_cache.append(layer_cache)
        x = self.ln_f(x)
        logits = masked_logits = loss = scores = None
        if labels is not None and segment_ids is None:
            # Only the N Part B targets are scored (28% of the B x T positions in glm.yaml's batches, mean of 20), as
            # BERT scores only its masked positions: this skips most of the (B, T, V) output matmul and softmax.
            target = labels != -100  # (B, T)
            h = x[target]  # (N, C)
            # the head sees N rows plus zero rows up to one of a few sizes: new matmul shapes are slow (nn/shapes.py)
            scored = self.lm_head(pad_rows(h))  # (N', V)
            # L = -1/N sum over the N Part B targets of log P(target | Part A, the Part B tokens before it);
            # the padding's target -100 scores nothing
            loss = cross_entropy(scored, pad_rows(labels[target], value=-100))
            masked_logits = scored[:len(h)]  # (N, V)
        else:
            logits = self.lm_head(x)  # (B, T, V)
        if segment_ids is not None:
            scores = cloze_scores(logits, labels, segment_ids)  # (B, C)
            if class_labels is not None:
                # L = -log p(y | x) = -log softmax_y(score(y))
                loss = F.cross_entropy(scores, class_labels)
        return GLMOutput(logits=logits, masked_logits=masked_logits, loss=loss, class_scores=scores, cache=new_cache)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, mask_positions: list[int], sop_id: int, eop_id: int,
                 max_new_tokens: int = 32, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                 generator: torch.Generator | None = None) -> list[list[int]]:
        """Fill the blanks of one text: input_ids (1, T) is Part A, mask_positions the indices of its mask
        tokens. Blanks are filled left to right, each by [sop] then tokens until [eop] (or max_new_tokens), at
        the blank's position p1 and p2 = 1, 2, ...; later blanks see the earlier fills, as in training.
        Returns the tokens of each fill, without [sop] and [eop]; a fill cut at max_new_tokens (at most
        block_size + 1) just ends there. Part A is encoded once, then one token per step with the KV cache.
        temperature 0 = greedy."""
        if input_ids.size(0) != 1:
            raise ValueError(f"generate fills the blanks of one text: input_ids must be (1, T), got {tuple(input_ids.shape)}")
        T = input_ids.size(1)
        if T > self.config.block_size:
            raise ValueError(f"Part A of {T} tokens is longer than model.block_size={self.config.block_size}")
        max_new_tokens = min(max_new_tokens, self.config.block_size + 1)  # p2 of the last input token <= block_size + 1
        was_training = self.training
        self.eval()
        device = input_ids.device
        part_a_len = torch.tensor([T], device=device)

        def step(ids: list[int], p1: list[int], p2: list[int], cache):
            as_tensor = lambda v: torch.tensor([v], device=device)  # noqa: E731  (1, n)
            out = self(as_tensor(ids), as_tensor(p1), as_tensor(p2), part_a_len, cache=cache, use_cache=True)
            return out.logits[:, -1, :], out.cache  # (1, V)

        _, cache = step(input_ids[0].tolist(), list(range(T)), [0] * T, None)  # Part A, bidirectional
        fills = []
        for pos in mask_positions:
            token, fill = sop_id, []
            for k in range(1, max_new_tokens + 1):  # feed [sop] or the last token at p2 = k, read the next one
                logits, cache = step([token], [pos], [k], cache)
                token = int(sample_next(logits, temperature, top_k, top_p, generator))
                if token == eop_id:
                    break
                fill.append(token)
            fills.append(fill)
        self.train(was_training)
        return fills

    def num_params(self, exclude_positions: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.pos_emb.weight.numel() - self.block_pos_emb.weight.numel() if exclude_positions else n


def cloze_scores(logits: torch.Tensor, labels: torch.Tensor, segment_ids: torch.Tensor) -> torch.Tensor:
    """score(c) = sum of log P(target) over the targets (labels != -100) of segment c + 1: (B, C), C = the
    largest segment id (every row holds every class). logits (B, T, V), labels and segment_ids (B, T)."""
    target = labels != -100  # (B, T)
    log_p = logits[target].float().log_softmax(dim=-1)  # (N, V) at the N targets only
    token_log_p = log_p.gather(1, labels[target][:, None]).squeeze(1)  # (N,) log P(target)
    row, cls = target.nonzero(as_tuple=True)[0], segment_ids[target] - 1  # (N,) each: the row and class of a target
    scores = token_log_p.new_zeros(len(labels), int(segment_ids.max()))  # (B, C)
    return scores.index_put_((row, cls), token_log_p, accumulate=True)

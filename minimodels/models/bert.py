"""BERT: a bidirectional Transformer encoder, pretrained by masked language modelling (Devlin et al. 2018).

Read top to bottom: the config, the MLM head, the model (embeddings -> post-LN blocks -> pooler -> the head
the config asks for) and BERT initialisation.

    h_0 = LN(E_tok[x] + E_pos[0..T-1] + E_seg[s])       token + position + segment embeddings (section 3.2)
    h_l = Block(h_{l-1})  for l = 1..L                  post-LN, bidirectional self-attention (minimodels/nn/block.py)
                                                        with model.moe, some blocks' FFN is a mixture of experts
    MLM:      P(x_t | x_masked) = softmax(LN(GELU(h_L[t] W_t)) E_tok^T + b)    decoder tied to E_tok (appendix A.1)
    pooler:   p = tanh(h_L[CLS] W_p)                    the [CLS] position summarises the sequence
    NSP:      P(IsNext | A, B) = softmax(p W_nsp)       optional, model.nsp
    classify: P(y | x) = softmax(dropout(p) W_c)        fine-tuning on one label per sequence (section 4.1)
    cloze:    score(y) = 1/|v(y)| sum_k log P([MASK]_k = v(y)_k | x)    a class as the words filling K blanks (PET)

Every position sees every other (no causal mask); padding is removed from attention by `padding_mask`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from minimodels.moe import MoEConfig, Routing, add_moe_loss, build_block_ffn
from minimodels.nn import (ACTIVATIONS, LayerCache, MultiHeadAttention, PostLNBlock, build_ffn, check_block_options,
                           cross_entropy, normal_init, pad_rows)
from minimodels.protocols import TrainedModel

HEADS = ("mlm", "classify", "pooler", "none")


@dataclass
class BERTConfig:
    arch: str = "bert"  # selects this model in configs
    vocab_size: int | None = None  # null = size of the run's tokenizer
    block_size: int = 128  # longest sequence the model supports (number of learned positions)
    type_vocab_size: int = 2  # segments: sentence A = 0, sentence B = 1
    n_layer: int = 4  # transformer blocks
    n_head: int = 4  # attention heads per block
    d_model: int = 256  # model width (BERT's hidden_size)
    d_ff: int | None = None  # feed-forward width; null = 4 * d_model
    ffn: str = "mlp"  # feed-forward kind, see minimodels/nn/feedforward.py FFN_KINDS
    activation: str = "gelu"  # gelu (BERT: exact, erf) | gelu_tanh | relu
    dropout: float = 0.1  # on embeddings, attention weights, residual branches and the classifier input
    attn_impl: str = "auto"  # auto | manual | sdpa (see minimodels/nn/attention.py)
    norm_eps: float = 1e-12  # LayerNorm epsilon (BERT: 1e-12)
    head: str = "mlm"  # mlm (pretraining) | classify (one label per sequence) | pooler (HF BertModel) | none (encoder)
    nsp: bool = False  # add the next-sentence-prediction head (needs head: mlm; trained by next_sentence_label)
    num_labels: int | None = None  # classes of the classify head; null = from the task
    init_from: str | None = None  # a pretraining run folder to start from (fine-tuning), e.g. runs/bert
    moe: MoEConfig | None = None  # mixture-of-experts FFNs (Switch-BERT), see minimodels/moe/config.py; null = dense

    def validate(self) -> None:
        for name in ("block_size", "type_vocab_size", "n_layer", "n_head", "d_model"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name}: must be positive, got {getattr(self, name)}")
        for name in ("vocab_size", "num_labels", "d_ff"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"model.{name}: must be positive or null, got {getattr(self, name)}")
        if self.d_model % self.n_head:
            raise ValueError(f"model.d_model: {self.d_model} is not divisible by model.n_head={self.n_head}")
        if self.head not in HEADS:
            raise ValueError(f"model.head: must be one of {', '.join(HEADS)}, got {self.head!r}")
        if self.nsp and self.head != "mlm":
            raise ValueError(f"model.nsp: the next-sentence head is a pretraining head; it needs model.head=mlm, got {self.head!r}")
        check_block_options(self)
        if self.moe is not None:
            self.moe.validate()


@dataclass
class BERTOutput:
    logits: torch.Tensor | None  # mlm without labels: (B, T, vocab_size), with blanks (B, K, vocab_size); classify: (B, num_labels)
    loss: torch.Tensor | None = None  # mean cross-entropy (nats) of the head (+ NSP), when labels are given
    masked_logits: torch.Tensor | None = None  # mlm with labels: (N, vocab_size) at the N labelled positions
    hidden_states: torch.Tensor | None = None  # (B, T, C) output of the last block
    pooled: torch.Tensor | None = None  # (B, C) tanh(h[CLS] W_p), when the model has a pooler
    nsp_logits: torch.Tensor | None = None  # (B, 2) IsNext / NotNext scores, when model.nsp
    routings: list[Routing] | None = None  # with model.moe: the Routing of each MoE block, in block order
    metrics: dict[str, torch.Tensor] | None = None  # with model.moe: per-layer aux/z-loss, drops, load (logged)
    class_scores: torch.Tensor | None = None  # with blanks: (B, num_classes) each class's mean log P of its verbalizer


class MLMHead(nn.Module):
    """The masked-LM output layer: a transform (dense -> GELU -> LayerNorm), then scores against every
    token embedding. The decoder matrix is the input embedding E_tok (passed in), only the bias is its own."""

    def __init__(self, d_model: int, vocab_size: int, activation: str, norm_eps: float):
        super().__init__()
        self.dense = nn.Linear(d_model, d_model)  # W_t
        self.act = ACTIVATIONS[activation]
        self.norm = nn.LayerNorm(d_model, eps=norm_eps)
        self.bias = nn.Parameter(torch.zeros(vocab_size))  # b, one per vocabulary entry

    def forward(self, h: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        """h (B, T, C), embedding (V, C) -> logits (B, T, V)."""
        return F.linear(self.norm(self.act(self.dense(h))), embedding, self.bias)  # LN(GELU(h W_t)) E_tok^T + b


class BERT(nn.Module, TrainedModel):
    def __init__(self, config: BERTConfig):
        super().__init__()
        config.validate()
        if config.vocab_size is None:
            raise ValueError("model.vocab_size: must be set (the trainer fills it from the tokenizer)")
        if config.head == "classify" and config.num_labels is None:
            raise ValueError("model.num_labels: must be set for model.head=classify (the task fills it)")
        self.config = c = config
        d_ff = c.d_ff or 4 * c.d_model
        self.tok_emb = nn.Embedding(c.vocab_size, c.d_model)  # E_tok
        self.pos_emb = nn.Embedding(c.block_size, c.d_model)  # E_pos, learned (not sinusoidal)
        self.seg_emb = nn.Embedding(c.type_vocab_size, c.d_model)  # E_seg, sentence A / B
        self.emb_norm = nn.LayerNorm(c.d_model, eps=c.norm_eps)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList()
        for i in range(c.n_layer):
            ffn = build_block_ffn(c.moe, i, c.d_model, d_ff, lambda width, experts=None: build_ffn(
                c.ffn, c.d_model, width, c.activation, c.dropout, True, experts))  # dense, or with model.moe an MoE layer
            attn = MultiHeadAttention(c.d_model, c.n_head, dropout=c.dropout, causal=False, impl=c.attn_impl)
            self.blocks.append(PostLNBlock(attn, ffn, partial(nn.LayerNorm, c.d_model, eps=c.norm_eps)))
        if c.head == "mlm":
            self.mlm = MLMHead(c.d_model, c.vocab_size, c.activation, c.norm_eps)
        # only what is used is built: no pooler for mlm alone or none
        self.pooler = nn.Linear(c.d_model, c.d_model) if c.head in ("classify", "pooler") or c.nsp else None  # W_p
        if c.nsp:
            self.nsp_head = nn.Linear(c.d_model, 2)  # W_nsp
        if c.head == "classify":
            self.classifier_dropout = nn.Dropout(c.dropout)
            self.classifier = nn.Linear(c.d_model, c.num_labels)  # W_c, new at fine-tuning time
        self.apply(normal_init)  # BERT: every matrix ~ N(0, 0.02^2) (truncated in the original TF code), biases 0

    def forward(self, input_ids: torch.Tensor, padding_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                next_sentence_label: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                cache: list[LayerCache] | None = None, blanks: torch.Tensor | None = None,
                verbalizers: torch.Tensor | None = None, class_labels: torch.Tensor | None = None) -> BERTOutput:
        """input_ids (B, T); padding_mask (B, T), 1 = real token, 0 = padding (Hugging Face convention);
        token_type_ids (B, T) segment ids, default all 0. labels: head mlm (B, T) with -100 where no token
        is predicted; head classify (B,) class ids. next_sentence_label (B,): 0 = B follows A, 1 = random B.

        MLM with labels scores only the labelled positions, as BERT's own pretraining code does (it gathers the
        masked positions before the output layer): with ~15% of positions labelled this skips most of the
        (B, T, V) output matmul, ~1.6x faster training here. Then `logits` is None and `masked_logits[i]`
        scores the i-th labelled position in row-major order, i.e. it predicts labels[labels != -100][i].
        Without labels the head scores every position: `logits` (B, T, V).

        P-tuning (minimodels/models/ptuning.py) drives a frozen BERT through two more inputs: inputs_embeds
        (B, T, C) replaces the token embeddings E_tok[input_ids] (positions and segments are still added), and
        cache, one LayerCache per block whose keys and values, each (B, nh, P, hs), are P extra positions every
        position attends to in that block's self-attention (P-tuning v2's prefixes).

        A cloze (PET, Schick & Schuetze 2021; data/package_classification.py PackagePromptTask) scores classes with
        the MLM head: blanks (B, K) are the positions of K [MASK] tokens, verbalizers (B, num_classes, K) the word
        pieces of each class's name, -100 after its last piece (see verbalizer_scores). Then `logits` (B, K, V)
        are the head's scores at the blanks, `class_scores` (B, num_classes), and with class_labels (B,) the loss
        is their cross-entropy."""
        B, T = input_ids.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than model.block_size={self.config.block_size}")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        pos = torch.arange(T, device=input_ids.device)  # (T,)
        tokens = self.tok_emb(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        x = tokens + self.pos_emb(pos) + self.seg_emb(token_type_ids)  # (B, T, C)
        x = self.drop(self.emb_norm(x))
        padding_mask = None if padding_mask is None else padding_mask.bool()  # (B, T), True = attend
        if cache is not None:  # the prefix keys are always attended: (B, P + T)
            padding_mask = F.pad(torch.ones_like(input_ids, dtype=torch.bool) if padding_mask is None else padding_mask,
                                 (cache[0].length, 0), value=True)
        routings = {}  # name -> Routing of each MoE block
        for i, block in enumerate(self.blocks):
            x, routing = block(x, padding_mask=padding_mask, cache=cache[i] if cache else None)  # (B, T, C)
            if routing is not None:
                routings[f"moe_block{i}"] = routing
        pooled = torch.tanh(self.pooler(x[:, 0])) if self.pooler is not None else None  # (B, C) from [CLS]

        logits, loss, masked_logits, class_scores = None, None, None, None
        if blanks is not None:
            if self.config.head != "mlm":
                raise ValueError(f"blanks: a cloze is scored by the MLM head; needs model.head=mlm, got {self.config.head!r}")
            h = x.gather(1, blanks[..., None].expand(-1, -1, x.size(-1)))  # (B, K, C): the blanks' states
            logits = self.mlm(h, self.tok_emb.weight)  # (B, K, V)
            class_scores = verbalizer_scores(logits, verbalizers)  # (B, num_classes)
            if class_labels is not None:  # L = -log softmax_y(score(y))
                loss = F.cross_entropy(class_scores, class_labels)
        elif self.config.head == "mlm" and labels is None:
            logits = self.mlm(x, self.tok_emb.weight)  # (B, T, V)
        elif self.config.head == "mlm":
            if labels.shape != (B, T):
                raise ValueError(f"labels: model.head=mlm expects (B, T) = {(B, T)}, got {tuple(labels.shape)}")
            masked = labels != -100  # (B, T), M = the positions with a label
            h = x[masked]  # (N, C)
            # the head sees N rows plus zero rows up to one of a few sizes: new matmul shapes are slow (nn/shapes.py)
            scored = self.mlm(pad_rows(h), self.tok_emb.weight)  # (N', V)
            # L_MLM = -1/|M| sum_{t in M} log P(x_t | x_masked); the padding's target -100 scores nothing
            loss = cross_entropy(scored, pad_rows(labels[masked], value=-100))
            masked_logits = scored[:len(h)]  # (N, V)
        elif self.config.head == "classify":
            logits = self.classifier(self.classifier_dropout(pooled))  # (B, num_labels)
            if labels is not None:
                if labels.shape != (B,):
                    raise ValueError(f"labels: model.head=classify expects one class per sequence (B,) = ({B},), "
                                     f"got {tuple(labels.shape)}")
                loss = F.cross_entropy(logits.float(), labels)
        elif labels is not None:
            raise ValueError(f"labels: model.head={self.config.head} has no output layer to train (use mlm or classify)")
        nsp_logits = self.nsp_head(pooled) if self.config.nsp else None  # (B, 2)
        if next_sentence_label is not None:
            if nsp_logits is None:
                raise ValueError("next_sentence_label: the model has no NSP head (set model.nsp: true)")
            # pretraining loss = L_MLM + L_NSP (section 3.1, tasks #1 and #2)
            nsp_loss = F.cross_entropy(nsp_logits.float(), next_sentence_label)
            loss = nsp_loss if loss is None else loss + nsp_loss
        loss, metrics = add_moe_loss(self.config.moe, routings, loss)  # + the MoE layers' aux and z-losses
        return BERTOutput(logits=logits, loss=loss, masked_logits=masked_logits, hidden_states=x, pooled=pooled,
                          nsp_logits=nsp_logits, routings=list(routings.values()) or None, metrics=metrics,
                          class_scores=class_scores)

    def num_params(self, exclude_positions: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.pos_emb.weight.numel() if exclude_positions else n


def verbalizer_scores(logits: torch.Tensor, verbalizers: torch.Tensor) -> torch.Tensor:
    """Each class's score from the MLM scores at K blanks, logits (B, K, V), and the classes' names as word pieces,
    verbalizers (B, num_classes, K) with -100 after a name's last piece: score(y) = 1/|v(y)| sum_k log P([MASK]_k =
    v(y)_k | x), the mean log-probability of its pieces, blank k holding piece k, all blanks predicted in one pass.
    A shorter name ignores the blanks after it. The mean, not PET's sum: a sum would rank a name down for each piece
    it has (PET multiplies the probabilities). Returns (B, num_classes), in float32."""
    log_p = logits.float().log_softmax(-1)  # (B, K, V)
    real = verbalizers != -100  # (B, num_classes, K)
    picked = log_p.gather(2, verbalizers.clamp(min=0).transpose(1, 2))  # (B, K, num_classes): log P(v(y)_k at k)
    return (picked.transpose(1, 2) * real).sum(-1) / real.sum(-1)  # (B, num_classes)

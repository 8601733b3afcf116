"""Hugging Face interop: our GPT, BERT and T5 <-> the transformers models, weights and config.

    gpt_from_hf(hf_model)  -> GPT                 convert an in-memory GPT2LMHeadModel
    gpt_to_hf(model)       -> GPT2LMHeadModel     convert back (e.g. to use HF's tooling)
    glm_to_hf(model)       -> GPT2LMHeadModel     GLM's Transformer; E_pos2 and the mask are passed in (glm_to_hf)
    load_hf_gpt2(path)     -> GPT                 load a local GPT-2 checkpoint folder, never downloads
    bert_from_hf / bert_to_hf                     BertForMaskedLM, BertModel, BertForPreTraining,
                                                  BertForSequenceClassification (see the BERT section)
    t5_from_hf / t5_to_hf                         T5ForConditionalGeneration, v1.0 or v1.1 (the T5 section)

Each pair computes the same function; what differs is storage, described at the top of each section.
GPT-2 writes its linear layers as `Conv1D`, which computes y = x W + b with W stored as (in, out), the
transpose of `nn.Linear`'s (out, in); BERT and T5 keep separate query / key / value layers where we fuse them.
`transformers` is an optional dependency, so it is imported inside the functions only.
"""

from __future__ import annotations

import torch

from minimodels.models.bert import BERT, BERTConfig
from minimodels.models.glm import GLM
from minimodels.models.gpt import GPT, GPTConfig
from minimodels.models.t5 import T5, T5Config

# Inside block i: our name -> (GPT-2 name, stored transposed). Prefixes: ours "blocks.{i}.", GPT-2 "transformer.h.{i}."
BLOCK_NAMES = {
    "ln1.weight": ("ln_1.weight", False),
    "ln1.bias": ("ln_1.bias", False),
    "attn.qkv.weight": ("attn.c_attn.weight", True),  # (C, 3C) in GPT-2; both lay out [q | k | v], heads contiguous
    "attn.qkv.bias": ("attn.c_attn.bias", False),
    "attn.proj.weight": ("attn.c_proj.weight", True),
    "attn.proj.bias": ("attn.c_proj.bias", False),
    "ln2.weight": ("ln_2.weight", False),
    "ln2.bias": ("ln_2.bias", False),
    "ffn.fc.weight": ("mlp.c_fc.weight", True),  # (C, d_ff) in GPT-2
    "ffn.fc.bias": ("mlp.c_fc.bias", False),
    "ffn.proj.weight": ("mlp.c_proj.weight", True),  # (d_ff, C) in GPT-2
    "ffn.proj.bias": ("mlp.c_proj.bias", False),
}
# Outside the blocks (nothing here is transposed). lm_head only when it is not tied to the embedding.
TOP_NAMES = {
    "tok_emb.weight": "transformer.wte.weight",
    "pos_emb.weight": "transformer.wpe.weight",
    "ln_f.weight": "transformer.ln_f.weight",
    "ln_f.bias": "transformer.ln_f.bias",
}
# GPT-2 `activation_function` -> our `activation`. gelu_new and gelu_pytorch_tanh are the same tanh approximation.
ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}
# GPT-2 options that change the computation in ways our GPT does not implement: name -> the value we support.
UNSUPPORTED = {
    "scale_attn_weights": True,  # False drops the 1/sqrt(d_head) scaling
    "scale_attn_by_inverse_layer_idx": False,  # extra 1/(layer + 1) scaling of attention scores
    "reorder_and_upcast_attn": False,  # fp32 attention scores computed in a different order
    "add_cross_attention": False,  # encoder-decoder cross-attention layers
}


def _name_pairs(n_layer: int, tied: bool) -> list[tuple[str, str, bool]]:
    """Every parameter as (our name, GPT-2 name, transposed)."""
    pairs = [(ours, theirs, False) for ours, theirs in TOP_NAMES.items()]
    if not tied:
        pairs.append(("lm_head.weight", "lm_head.weight", False))
    for i in range(n_layer):
        pairs += [(f"blocks.{i}.{ours}", f"transformer.h.{i}.{theirs}", t) for ours, (theirs, t) in BLOCK_NAMES.items()]
    return pairs


@torch.no_grad()
def _copy_weights(ours: dict, theirs: dict, pairs, to_hf: bool) -> None:
    """Copy tensors between the two name -> parameter dicts, transposing the Conv1D weights."""
    for our_name, hf_name, transposed in pairs:
        src, dst = (ours[our_name], theirs[hf_name]) if to_hf else (theirs[hf_name], ours[our_name])
        src = src.t() if transposed else src
        if src.shape != dst.shape:
            raise ValueError(f"shape mismatch for {our_name} <-> {hf_name}: {tuple(src.shape)} vs {tuple(dst.shape)}")
        dst.copy_(src)


def gpt_from_hf(hf_model, attn_impl: str = "auto") -> GPT:
    """Build our GPT (dropout 0) with the config and weights of a transformers GPT2LMHeadModel."""
    from transformers import GPT2LMHeadModel

    if not isinstance(hf_model, GPT2LMHeadModel):
        raise ValueError(f"expected a transformers GPT2LMHeadModel, got {type(hf_model).__name__}")
    hc = hf_model.config
    for option, supported in UNSUPPORTED.items():
        if getattr(hc, option, supported) != supported:
            raise ValueError(f"GPT2Config.{option}={getattr(hc, option)!r} is not supported (only {supported!r})")
    if hc.activation_function not in ACTIVATIONS:
        raise ValueError(f"GPT2Config.activation_function={hc.activation_function!r} is not supported "
                         f"(valid: {', '.join(ACTIVATIONS)})")
    config = GPTConfig(
        vocab_size=hc.vocab_size, block_size=hc.n_positions, n_layer=hc.n_layer, n_head=hc.n_head,
        d_model=hc.n_embd, d_ff=hc.n_inner, activation=ACTIVATIONS[hc.activation_function], dropout=0.0,
        bias=True, tie_weights=hc.tie_word_embeddings, attn_impl=attn_impl, norm_eps=hc.layer_norm_epsilon,
    )
    model = GPT(config).to(hf_model.device)
    pairs = _name_pairs(config.n_layer, config.tie_weights)
    _copy_weights(dict(model.named_parameters()), dict(hf_model.named_parameters()), pairs, to_hf=False)
    return model.train(hf_model.training)


def dense_only(config, hf_name: str) -> None:
    """Hugging Face's GPT-2, BERT and T5 have no mixture-of-experts layers."""
    if getattr(config, "moe", None) is not None:
        raise ValueError(f"model.moe: a model with MoE layers cannot be exported to {hf_name}, which is dense")


def gpt_to_hf(model: GPT, attn_implementation: str | None = None):
    """Export our GPT to a transformers GPT2LMHeadModel with the same weights. attn_implementation:
    HF's attention kernel ("eager", "sdpa"; None = HF's default)."""
    return _to_gpt2(model, model.config.tie_weights, attn_implementation)


def glm_to_hf(model: GLM, attn_implementation: str | None = None):
    """GLM's Transformer as a transformers GPT2LMHeadModel with the same weights: E_tok -> wte (tied to the
    head), E_pos1 -> wpe, the blocks and ln_f as for GPT. GPT-2 has no place for the rest of GLM, which the
    caller passes in: E_pos2 and p1 as `inputs_embeds=wte(input_ids) + model.block_pos_emb(block_position_ids)`
    and `position_ids=position_ids`, and the mask as a 4-D `attention_mask` made from glm_attn_mask, shape
    (B, 1, T, T) (boolean for "sdpa", additive 0 / -inf for "eager"; HF uses a 4-D mask as given)."""
    return _to_gpt2(model, True, attn_implementation)


def _to_gpt2(model: GPT | GLM, tied: bool, attn_implementation: str | None):
    """A GPT2LMHeadModel with the config and weights of our GPT or GLM (GLM without its E_pos2)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    c = model.config
    dense_only(c, "GPT-2")
    if not c.bias:
        raise ValueError("model.bias=False cannot be exported: GPT-2 always has biases in Linear layers and LayerNorms")
    if c.ffn != "mlp":
        raise ValueError(f"model.ffn={c.ffn!r} cannot be exported: GPT-2 only has the dense MLP")
    to_hf_activation = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}
    if c.activation not in to_hf_activation:
        raise ValueError(f"model.activation={c.activation!r} has no GPT-2 equivalent")
    hc = GPT2Config(
        vocab_size=c.vocab_size, n_positions=c.block_size, n_layer=c.n_layer, n_head=c.n_head, n_embd=c.d_model,
        n_inner=c.d_ff, activation_function=to_hf_activation[c.activation], layer_norm_epsilon=c.norm_eps,
        resid_pdrop=c.dropout, embd_pdrop=c.dropout, attn_pdrop=c.dropout, tie_word_embeddings=tied,
        bos_token_id=None, eos_token_id=None,  # our models know no GPT-2 special tokens; 50256 may not exist here
        attn_implementation=attn_implementation,
    )
    hf_model = GPT2LMHeadModel(hc).to(model.tok_emb.weight.device)
    pairs = _name_pairs(c.n_layer, tied)
    _copy_weights(dict(model.named_parameters()), dict(hf_model.named_parameters()), pairs, to_hf=True)
    return hf_model.train(model.training)


def load_hf_gpt2(path: str, attn_impl: str = "auto") -> GPT:
    """Load a GPT-2 checkpoint folder saved with `save_pretrained` (config.json + weights) into our GPT.
    Only local files are read: nothing is downloaded."""
    from transformers import GPT2LMHeadModel

    hf_model = GPT2LMHeadModel.from_pretrained(path, local_files_only=True)
    return gpt_from_hf(hf_model, attn_impl=attn_impl)


# =========================================================================== BERT
#
#     bert_from_hf(hf_model) -> BERT     from BertForMaskedLM, BertModel, BertForPreTraining or
#                                        BertForSequenceClassification (the head follows the class)
#     bert_to_hf(model)      -> the transformers class of the model's head, with the same weights
#
# Same computation (Devlin et al. 2018): post-LN blocks, learned positions and segments, the MLM decoder tied
# to the word embeddings. Storage differs in one place: HF keeps separate query / key / value Linear layers,
# we keep one fused `qkv` whose output rows are [q | k | v]; so our qkv = cat(query, key, value) along dim 0.
# Nothing is transposed (both use nn.Linear).

# Inside block i: our name -> HF names concatenated along dim 0. Prefixes: ours "blocks.{i}.", HF "encoder.layer.{i}."
BERT_BLOCK_NAMES = {
    "attn.qkv.weight": ["attention.self.query.weight", "attention.self.key.weight", "attention.self.value.weight"],
    "attn.qkv.bias": ["attention.self.query.bias", "attention.self.key.bias", "attention.self.value.bias"],
    "attn.proj.weight": ["attention.output.dense.weight"],
    "attn.proj.bias": ["attention.output.dense.bias"],
    "ln1.weight": ["attention.output.LayerNorm.weight"],
    "ln1.bias": ["attention.output.LayerNorm.bias"],
    "ffn.fc.weight": ["intermediate.dense.weight"],
    "ffn.fc.bias": ["intermediate.dense.bias"],
    "ffn.proj.weight": ["output.dense.weight"],
    "ffn.proj.bias": ["output.dense.bias"],
    "ln2.weight": ["output.LayerNorm.weight"],
    "ln2.bias": ["output.LayerNorm.bias"],
}
BERT_EMBEDDING_NAMES = {  # HF prefix "embeddings."
    "tok_emb.weight": "word_embeddings.weight",
    "pos_emb.weight": "position_embeddings.weight",
    "seg_emb.weight": "token_type_embeddings.weight",
    "emb_norm.weight": "LayerNorm.weight",
    "emb_norm.bias": "LayerNorm.bias",
}
BERT_HEAD_NAMES = {  # full HF names, outside the encoder; each exists only if our model has that head
    "pooler.weight": "{bert}pooler.dense.weight",
    "pooler.bias": "{bert}pooler.dense.bias",
    "mlm.dense.weight": "cls.predictions.transform.dense.weight",
    "mlm.dense.bias": "cls.predictions.transform.dense.bias",
    "mlm.norm.weight": "cls.predictions.transform.LayerNorm.weight",
    "mlm.norm.bias": "cls.predictions.transform.LayerNorm.bias",
    "mlm.bias": "cls.predictions.bias",  # the decoder's weight is the word embedding matrix (tied)
    "nsp_head.weight": "cls.seq_relationship.weight",
    "nsp_head.bias": "cls.seq_relationship.bias",
    "classifier.weight": "classifier.weight",
    "classifier.bias": "classifier.bias",
}
BERT_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}
# HF class name -> (our head, nsp, prefix of the encoder's parameter names)
BERT_CLASSES = {
    "BertModel": ("pooler", False, ""),  # head none: a BertModel built without its pooler
    "BertForMaskedLM": ("mlm", False, "bert."),
    "BertForPreTraining": ("mlm", True, "bert."),
    "BertForSequenceClassification": ("classify", False, "bert."),
}


def _bert_name_pairs(model: BERT, prefix: str) -> list[tuple[str, list[str]]]:
    """Every parameter of our model as (our name, [HF names]); the HF tensors concatenate to ours."""
    ours = dict(model.named_parameters())
    pairs = [(o, [f"{prefix}embeddings.{h}"]) for o, h in BERT_EMBEDDING_NAMES.items()]
    for i in range(model.config.n_layer):
        pairs += [(f"blocks.{i}.{o}", [f"{prefix}encoder.layer.{i}.{h}" for h in hs]) for o, hs in BERT_BLOCK_NAMES.items()]
    pairs += [(o, [h.format(bert=prefix)]) for o, h in BERT_HEAD_NAMES.items() if o in ours]
    return pairs


@torch.no_grad()
def _copy_stacked_weights(model, hf_model, pairs, to_hf: bool) -> None:
    """Copy weights for BERT and T5, where one of our tensors may be several HF tensors stacked along dim 0
    (our fused qkv = HF's query, key, value). pairs: (our name, [HF names]). HF's tied names count too."""
    ours = dict(model.named_parameters())
    theirs = dict(hf_model.named_parameters(remove_duplicate=False))
    for our_name, hf_names in pairs:
        missing = [h for h in hf_names if h not in theirs]
        if missing:
            raise ValueError(f"{type(hf_model).__name__} has no parameter {missing[0]} (for our {our_name})")
        parts = [theirs[h] for h in hf_names]
        if sum(p.shape[0] for p in parts) != ours[our_name].shape[0] or parts[0].shape[1:] != ours[our_name].shape[1:]:
            shapes = " + ".join(str(tuple(p.shape)) for p in parts)
            raise ValueError(f"shape mismatch for {our_name} <-> {', '.join(hf_names)}: {tuple(ours[our_name].shape)} vs {shapes}")
        if to_hf:
            for part, chunk in zip(parts, ours[our_name].split([p.shape[0] for p in parts])):
                part.copy_(chunk)
        else:
            ours[our_name].copy_(torch.cat(parts))


def bert_from_hf(hf_model, attn_impl: str = "auto") -> BERT:
    """Build our BERT (dropout 0) with the config and weights of a transformers BERT model; the head follows
    the class: BertForMaskedLM -> mlm, BertForPreTraining -> mlm + nsp, BertForSequenceClassification ->
    classify, BertModel -> pooler (hidden states and pooled output), or none when built without its pooler."""
    name = type(hf_model).__name__
    if name not in BERT_CLASSES:
        raise ValueError(f"expected one of {', '.join(BERT_CLASSES)}, got {name}")
    head, nsp, prefix = BERT_CLASSES[name]
    if name == "BertModel" and hf_model.pooler is None:  # BertModel(config, add_pooling_layer=False)
        head = "none"
    hc = hf_model.config
    if hc.hidden_act not in BERT_ACTIVATIONS:
        raise ValueError(f"BertConfig.hidden_act={hc.hidden_act!r} is not supported (valid: {', '.join(BERT_ACTIVATIONS)})")
    if getattr(hc, "position_embedding_type", "absolute") != "absolute" or hc.is_decoder:
        raise ValueError("only the bidirectional BERT encoder with absolute positions is supported")
    if head == "mlm" and not hc.tie_word_embeddings:
        raise ValueError("BertConfig.tie_word_embeddings=False is not supported: our MLM decoder is the embedding matrix")
    if head == "classify" and (hc.problem_type or "single_label_classification") != "single_label_classification":
        raise ValueError(f"BertConfig.problem_type={hc.problem_type!r} is not supported (single-label classification only)")
    config = BERTConfig(
        vocab_size=hc.vocab_size, block_size=hc.max_position_embeddings, type_vocab_size=hc.type_vocab_size,
        n_layer=hc.num_hidden_layers, n_head=hc.num_attention_heads, d_model=hc.hidden_size, d_ff=hc.intermediate_size,
        activation=BERT_ACTIVATIONS[hc.hidden_act], dropout=0.0, attn_impl=attn_impl, norm_eps=hc.layer_norm_eps,
        head=head, nsp=nsp, num_labels=hc.num_labels if head == "classify" else None,
    )
    model = BERT(config).to(hf_model.device)
    _copy_stacked_weights(model, hf_model, _bert_name_pairs(model, prefix), to_hf=False)
    return model.train(hf_model.training)


def bert_to_hf(model: BERT, attn_implementation: str | None = None):
    """Export our BERT to the transformers class of its head (mlm -> BertForMaskedLM, mlm + nsp ->
    BertForPreTraining, classify -> BertForSequenceClassification, pooler -> BertModel, none -> BertModel
    without its pooler), same weights."""
    import transformers

    c = model.config
    dense_only(c, "BERT")
    if c.ffn != "mlp":
        raise ValueError(f"model.ffn={c.ffn!r} cannot be exported: BERT only has the dense MLP")
    to_hf_activation = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu"}
    hc = transformers.BertConfig(
        vocab_size=c.vocab_size, hidden_size=c.d_model, num_hidden_layers=c.n_layer, num_attention_heads=c.n_head,
        intermediate_size=c.d_ff or 4 * c.d_model, hidden_act=to_hf_activation[c.activation],
        hidden_dropout_prob=c.dropout, attention_probs_dropout_prob=c.dropout, max_position_embeddings=c.block_size,
        type_vocab_size=c.type_vocab_size, layer_norm_eps=c.norm_eps, num_labels=c.num_labels or 2,
        pad_token_id=None,  # our embeddings have no frozen padding row
        attn_implementation=attn_implementation,
    )
    head = "pooler" if c.head == "none" else c.head
    (name,) = [n for n, (h, nsp, _) in BERT_CLASSES.items() if h == head and nsp == c.nsp]
    pooler = {"add_pooling_layer": False} if c.head == "none" else {}
    hf_model = getattr(transformers, name)(hc, **pooler).to(model.tok_emb.weight.device)
    _copy_stacked_weights(model, hf_model, _bert_name_pairs(model, BERT_CLASSES[name][2]), to_hf=True)
    return hf_model.train(model.training)


# =========================================================================== T5
#
#     t5_from_hf(hf_model) -> T5                          from a T5ForConditionalGeneration (v1.0 or v1.1)
#     t5_to_hf(model)      -> T5ForConditionalGeneration  with the same weights
#
# Same computation (Raffel et al. 2019): RMSNorm pre-LN blocks, one relative position bias table per stack,
# unscaled attention, no biases. Storage differs in three places:
# - HF keeps separate q / k / v Linear layers; our self-attention fuses them into `qkv` = cat(q, k, v) and
#   our cross-attention keeps `q` and `kv` = cat(k, v), all along dim 0 (nothing is transposed);
# - HF keeps the position bias table in the first block's self-attention; we keep it in the stack;
# - which LM head: in transformers 5.x `tie_word_embeddings` is always True and the v1.0 / v1.1 choice
#   (rescale the decoder output and share the embedding, or not) lives in `scale_decoder_outputs`;
#   in 4.x it was `tie_word_embeddings` itself. Our `tie_weights` is that choice.

# Inside a block: our name -> HF names (concatenated along dim 0). Prefixes: ours "{stack}.blocks.{i}.",
# HF "{stack}.block.{i}.". The decoder's feed-forward is its layer.2 (layer.1 is cross-attention).
T5_SELF_ATTENTION_NAMES = {
    "ln1.weight": ["layer.0.layer_norm.weight"],
    "attn.qkv.weight": ["layer.0.SelfAttention.q.weight", "layer.0.SelfAttention.k.weight", "layer.0.SelfAttention.v.weight"],
    "attn.proj.weight": ["layer.0.SelfAttention.o.weight"],
}
T5_CROSS_ATTENTION_NAMES = {
    "ln_cross.weight": ["layer.1.layer_norm.weight"],
    "cross_attn.q.weight": ["layer.1.EncDecAttention.q.weight"],
    "cross_attn.kv.weight": ["layer.1.EncDecAttention.k.weight", "layer.1.EncDecAttention.v.weight"],
    "cross_attn.proj.weight": ["layer.1.EncDecAttention.o.weight"],
}
T5_FFN_NAMES = {  # our ffn kind -> {our name: HF name after "layer.{1 or 2}."}
    "mlp": {"fc.weight": "DenseReluDense.wi.weight", "proj.weight": "DenseReluDense.wo.weight"},
    "gated": {"gate.weight": "DenseReluDense.wi_0.weight", "fc.weight": "DenseReluDense.wi_1.weight",
              "proj.weight": "DenseReluDense.wo.weight"},
}
# HF `dense_act_fn` -> our `activation` (HF turns "gated-gelu" into gelu_new, the tanh approximation)
T5_ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}


def _t5_name_pairs(model: T5) -> list[tuple[str, list[str]]]:
    """Every parameter of our T5 as (our name, [HF names]); the HF tensors concatenate to ours."""
    c = model.config
    pairs = [("tok_emb.weight", ["shared.weight"])]
    if not c.tie_weights:
        pairs.append(("lm_head.weight", ["lm_head.weight"]))
    for stack, n_layer in (("encoder", c.n_layer), ("decoder", c.n_decoder_layer or c.n_layer)):
        pairs.append((f"{stack}.pos_bias.bias.weight", [f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]))
        pairs.append((f"{stack}.ln_f.weight", [f"{stack}.final_layer_norm.weight"]))
        names = dict(T5_SELF_ATTENTION_NAMES, **(T5_CROSS_ATTENTION_NAMES if stack == "decoder" else {}))
        ff = 2 if stack == "decoder" else 1
        names["ln2.weight"] = [f"layer.{ff}.layer_norm.weight"]
        names.update({f"ffn.{o}": [f"layer.{ff}.{h}"] for o, h in T5_FFN_NAMES[c.ffn].items()})
        for i in range(n_layer):
            pairs += [(f"{stack}.blocks.{i}.{o}", [f"{stack}.block.{i}.{h}" for h in hs]) for o, hs in names.items()]
    return pairs


def t5_from_hf(hf_model, attn_impl: str = "auto") -> T5:
    """Build our T5 (dropout 0) with the config and weights of a transformers T5ForConditionalGeneration."""
    from transformers import T5ForConditionalGeneration

    if not isinstance(hf_model, T5ForConditionalGeneration):
        raise ValueError(f"expected a transformers T5ForConditionalGeneration, got {type(hf_model).__name__}")
    hc = hf_model.config
    if hc.dense_act_fn not in T5_ACTIVATIONS:
        raise ValueError(f"T5Config.feed_forward_proj={hc.feed_forward_proj!r} is not supported "
                         f"(activations: {', '.join(T5_ACTIVATIONS)})")
    start = getattr(hc, "decoder_start_token_id", None)
    if start is not None and start != hc.pad_token_id:
        raise ValueError(f"T5Config.decoder_start_token_id={start} is not supported: our decoder starts with "
                         f"pad_token_id={hc.pad_token_id}")
    tied = getattr(hc, "scale_decoder_outputs", hc.tie_word_embeddings)  # see the note at the top of this section
    if tied and not torch.equal(hf_model.lm_head.weight, hf_model.shared.weight):
        raise ValueError("the HF model rescales its decoder output (v1.0) but its lm_head is not the shared "
                         "embedding: our T5 ties the two in that case")
    config = T5Config(
        vocab_size=hc.vocab_size, d_model=hc.d_model, n_layer=hc.num_layers, n_decoder_layer=hc.num_decoder_layers,
        n_head=hc.num_heads, d_head=hc.d_kv, d_ff=hc.d_ff, ffn="gated" if hc.is_gated_act else "mlp",
        activation=T5_ACTIVATIONS[hc.dense_act_fn], num_buckets=hc.relative_attention_num_buckets,
        max_distance=hc.relative_attention_max_distance, dropout=0.0, tie_weights=bool(tied),
        norm_eps=hc.layer_norm_epsilon, attn_impl=attn_impl, pad_token_id=hc.pad_token_id,
    )
    model = T5(config).to(hf_model.device)
    _copy_stacked_weights(model, hf_model, _t5_name_pairs(model), to_hf=False)
    return model.train(hf_model.training)


def t5_to_hf(model: T5, attn_implementation: str | None = None):
    """Export our T5 to a transformers T5ForConditionalGeneration with the same weights. attn_implementation:
    HF's attention kernel ("eager", "sdpa"; None = HF's default)."""
    from transformers import T5Config as HFT5Config
    from transformers import T5ForConditionalGeneration

    c = model.config
    dense_only(c, "T5")
    feed_forward = {("mlp", "relu"): "relu", ("mlp", "gelu"): "gelu", ("mlp", "gelu_tanh"): "gelu_new",
                    ("gated", "relu"): "gated-relu", ("gated", "gelu_tanh"): "gated-gelu"}
    if (c.ffn, c.activation) not in feed_forward:
        raise ValueError(f"model.ffn={c.ffn!r} with model.activation={c.activation!r} has no HF T5 equivalent")
    hc = HFT5Config(
        vocab_size=c.vocab_size, d_model=c.d_model, d_kv=c.d_head or c.d_model // c.n_head, d_ff=c.d_ff,
        num_layers=c.n_layer, num_decoder_layers=c.n_decoder_layer or c.n_layer, num_heads=c.n_head,
        relative_attention_num_buckets=c.num_buckets, relative_attention_max_distance=c.max_distance,
        dropout_rate=c.dropout, layer_norm_epsilon=c.norm_eps, feed_forward_proj=feed_forward[c.ffn, c.activation],
        tie_word_embeddings=c.tie_weights, pad_token_id=c.pad_token_id, decoder_start_token_id=c.pad_token_id,
        eos_token_id=None,  # our T5 knows no eos token; T5's 1 may not be one here
        attn_implementation=attn_implementation,
    )
    hf_model = T5ForConditionalGeneration(hc).to(model.tok_emb.weight.device)
    if not c.tie_weights and hf_model.lm_head.weight is hf_model.shared.weight:  # transformers 5.x ties it anyway
        hf_model.lm_head.weight = torch.nn.Parameter(torch.empty_like(hf_model.shared.weight))
    _copy_stacked_weights(model, hf_model, _t5_name_pairs(model), to_hf=True)
    return hf_model.train(model.training)

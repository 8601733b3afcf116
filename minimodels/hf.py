"""Hugging Face interop: our GPT <-> transformers' GPT2LMHeadModel, weights and config.

    gpt_from_hf(hf_model)  -> GPT                 convert an in-memory GPT2LMHeadModel
    gpt_to_hf(model)       -> GPT2LMHeadModel     convert back (e.g. to use HF's tooling)
    load_hf_gpt2(path)     -> GPT                 load a local GPT-2 checkpoint folder, never downloads

Both models compute the same function (GPT-2, Radford et al. 2019): pre-LN blocks, learned positions,
tied LM head. The only real difference is storage: GPT-2 writes its linear layers as `Conv1D`, which
computes y = x W + b with W stored as (in, out), the transpose of `nn.Linear`'s (out, in).
`transformers` is an optional dependency, so it is imported inside the functions only.
"""

from __future__ import annotations

import torch

from minimodels.models.gpt import GPT, GPTConfig

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
        n_embd=hc.n_embd, d_ff=hc.n_inner, activation=ACTIVATIONS[hc.activation_function], dropout=0.0,
        bias=True, tie_weights=hc.tie_word_embeddings, attn_impl=attn_impl, norm_eps=hc.layer_norm_epsilon,
    )
    model = GPT(config).to(hf_model.device)
    pairs = _name_pairs(config.n_layer, config.tie_weights)
    _copy_weights(dict(model.named_parameters()), dict(hf_model.named_parameters()), pairs, to_hf=False)
    return model.train(hf_model.training)


def gpt_to_hf(model: GPT, attn_implementation: str | None = None):
    """Export our GPT to a transformers GPT2LMHeadModel with the same weights. attn_implementation:
    HF's attention kernel ("eager", "sdpa"; None = HF's default)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    c = model.config
    if not c.bias:
        raise ValueError("model.bias=False cannot be exported: GPT-2 always has biases in Linear layers and LayerNorms")
    if c.ffn != "mlp":
        raise ValueError(f"model.ffn={c.ffn!r} cannot be exported: GPT-2 only has the dense MLP")
    to_hf_activation = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}
    if c.activation not in to_hf_activation:
        raise ValueError(f"model.activation={c.activation!r} has no GPT-2 equivalent")
    hc = GPT2Config(
        vocab_size=c.vocab_size, n_positions=c.block_size, n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd,
        n_inner=c.d_ff, activation_function=to_hf_activation[c.activation], layer_norm_epsilon=c.norm_eps,
        resid_pdrop=c.dropout, embd_pdrop=c.dropout, attn_pdrop=c.dropout, tie_word_embeddings=c.tie_weights,
        bos_token_id=None, eos_token_id=None,  # our GPT knows no special tokens; GPT-2's 50256 may not exist here
        attn_implementation=attn_implementation,
    )
    hf_model = GPT2LMHeadModel(hc).to(model.tok_emb.weight.device)
    pairs = _name_pairs(c.n_layer, c.tie_weights)
    _copy_weights(dict(model.named_parameters()), dict(hf_model.named_parameters()), pairs, to_hf=True)
    return hf_model.train(model.training)


def load_hf_gpt2(path: str, attn_impl: str = "auto") -> GPT:
    """Load a GPT-2 checkpoint folder saved with `save_pretrained` (config.json + weights) into our GPT.
    Only local files are read: nothing is downloaded."""
    from transformers import GPT2LMHeadModel

    hf_model = GPT2LMHeadModel.from_pretrained(path, local_files_only=True)
    return gpt_from_hf(hf_model, attn_impl=attn_impl)

"""P-tuning: continuous prompts for a frozen language model (Liu et al. 2021, "GPT Understands, Too").

A manual prompt asks a pretrained LM for a fact in words: "Dante was born in [MASK] .". P-tuning keeps the
LM frozen and searches the prompt in embedding space instead. A template mixes trainable pseudo tokens
[P_i], the input (the subject x) and the target slot; with data.template [3, subject, 3, mask, 3]:

    [CLS] [P_0] [P_1] [P_2] x [P_3] [P_4] [P_5] [MASK] [P_6] [P_7] [P_8] [SEP]

The pseudo tokens' input embeddings are not looked up in the vocabulary but produced by a prompt encoder
from trainable vectors p_0..p_{n-1} (section 3.2: a bidirectional LSTM, so that the prompts depend on each
other, then a two-layer MLP with ReLU):

    h_0..h_{n-1} = MLP(BiLSTM(p_0..p_{n-1}))        encoder: lstm (the paper)
    h_i = MLP(p_i)                                  encoder: mlp
    h_i = p_i                                       encoder: none (the raw embeddings are the parameters)

    min_h  -log P_LM(y | e([CLS]), h_0, h_1, h_2, e(x), h_3, ...)        only the prompt is trained

With `tune_lm` the LM's weights train too, with the same learning rate (the paper's abstract calls P-tuning
"effective for both frozen and tuned language models"):

    min_{h, LM}  -log P_LM(y | e([CLS]), h_0, ..., e(x), ...)

Template words other than subject/mask are anchors: real tokens, embedded by the LM itself (section 3.2
found that an anchor such as "?" in "[PRE][prompt tokens][HYP]?[prompt tokens][MASK]" helps).

A GPT backbone predicts the object as the next token after the template ([3, subject, 3]), from the logits
at the position before it. With `deep`, every block of the LM also attends to trainable prefix keys and
values (P-tuning v2, Liu et al. 2022: "deep prompt tuning"), as many per block as the template has pseudo
tokens; they are keys and values, not tokens, so the real tokens keep positions 0..T-1 on both backbones.
The model keeps one prompt per relation of the knowledge base (the paper trains a prompt per LAMA relation):
batches carry `relation`, and each example gets its own relation's prompt. On the docstring-package task
(data.task package_ptuning, one "relation") a BERT backbone scores classes as a cloze instead: the template's
"mask" is K blanks and each class is scored by its name's pieces there (bert.py verbalizer_scores), the
loss the cross-entropy over the classes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from minimodels.models.bert import BERT, BERTConfig
from minimodels.models.gpt import GPT, GPTConfig
from minimodels.nn import KV, LayerCache
from minimodels.protocols import TrainedModel
from minimodels.schema import build

ENCODERS = ("lstm", "mlp", "none")


@dataclass
class PTuningConfig:
    arch: str = "ptuning"  # selects this model in configs
    init_from: str | None = None  # the pretrained LM's run folder (runs/kb_bert, runs/kb_gpt)
    tune_lm: bool = False  # the LM trains with the prompt (the paper's "tuned" setting); false: it stays frozen
    encoder: str = "lstm"  # prompt encoder: lstm (BiLSTM + MLP, the paper) | mlp | none (raw embeddings)
    hidden: int | None = None  # width of p_i and of the encoder; null = the LM's d_model
    deep: bool = False  # P-tuning v2: trainable prefix keys/values in every block of the LM too
    num_prompt_tokens: int | None = None  # pseudo tokens in the template; null = counted from data.template
    num_relations: int | None = None  # one prompt per relation; null = from the task
    backbone: dict | None = None  # the LM's model section; null = the run fills it from init_from/config.yaml

    def validate(self) -> None:
        if self.encoder not in ENCODERS:
            raise ValueError(f"model.encoder: must be one of {', '.join(ENCODERS)}, got {self.encoder!r}")
        if self.encoder == "none" and self.hidden is not None:
            raise ValueError(f"model.hidden: encoder none has no hidden layer (p_i are the LM's d_model wide); "
                             f"leave it null, got {self.hidden}")
        if self.init_from is None and self.backbone is None:
            raise ValueError("model.init_from: P-tuning needs the run folder of a pretrained LM (e.g. runs/kb_bert)")
        for name in ("hidden", "num_prompt_tokens", "num_relations"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"model.{name}: must be positive or null, got {getattr(self, name)}")


@dataclass
class PTuningOutput:
    logits: torch.Tensor  # (B, V): the LM's scores for each example's object slot; without labels (B, T, V); cloze (B, K, V)
    loss: torch.Tensor | None = None  # mean cross-entropy of the objects (nats), when labels are given
    metrics: dict[str, torch.Tensor] | None = None  # none: nothing to log beyond the loss
    class_scores: torch.Tensor | None = None  # cloze (BERT backbone): (B, num_classes), see BERT.forward


BACKBONES = {"bert": (BERTConfig, BERT), "gpt": (GPTConfig, GPT)}  # the LMs P-tuning drives: config, model class


class PromptEncoder(nn.Module):
    """The n pseudo-token embeddings h_0..h_{n-1} (n, C) of one relation, from trainable p_0..p_{n-1} (n, H)."""

    def __init__(self, n: int, hidden: int, d_model: int, kind: str):
        super().__init__()
        self.kind = kind
        self.p = nn.Parameter(torch.randn(n, d_model if kind == "none" else hidden) * 0.02)  # p_i
        width = hidden  # what the MLP reads: p_i, or the two directions' states side by side
        if kind == "lstm":  # 2 layers, H/2 per direction (rounded up: an odd H gives states H + 1 wide)
            self.lstm = nn.LSTM(hidden, (hidden + 1) // 2, num_layers=2, bidirectional=True, batch_first=True)
            width = 2 * self.lstm.hidden_size
        if kind in ("lstm", "mlp"):
            self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, d_model))

    def forward(self) -> torch.Tensor:
        if self.kind == "none":
            return self.p  # h_i = p_i
        x = self.p[None]  # (1, n, H)
        if self.kind == "lstm":
            x = self.lstm(x)[0]  # (1, n, 2 ceil(H/2)): each h_i sees every p_j, left and right
        return self.mlp(x)[0]  # (n, C)


class PTuning(nn.Module, TrainedModel):
    def __init__(self, config: PTuningConfig):
        super().__init__()
        config.validate()
        if config.num_relations is None or config.num_prompt_tokens is None:
            raise ValueError("model.num_relations / model.num_prompt_tokens: must be set (the kb_probe task fills them)")
        if config.backbone is None:
            raise ValueError("model.backbone: must be set (the run fills it from model.init_from/config.yaml)")
        self.config = c = config
        arch = config.backbone.get("arch")
        if arch not in BACKBONES:
            raise ValueError(f"model.init_from: P-tuning drives a BERT or GPT, got model.arch={arch}")
        lm_config = build(BACKBONES[arch][0], config.backbone, "model.backbone", "config")
        self.causal = arch == "gpt"
        self.backbone = BACKBONES[arch][1](lm_config)  # weights: pretrained_parts(), loaded by the run
        self.backbone.requires_grad_(c.tune_lm)
        C, n = lm_config.d_model, c.num_prompt_tokens
        self.prompts = nn.ModuleList(PromptEncoder(n, c.hidden or C, C, c.encoder) for _ in range(c.num_relations))
        if c.deep:  # per relation and block: (k, v) of n prefix positions, each (nh, n, hs)
            L, nh = lm_config.n_layer, lm_config.n_head
            self.prefix = nn.Parameter(torch.randn(c.num_relations, L, 2, nh, n, C // nh) * 0.02)

    def pretrained_parts(self) -> dict[str, str | None]:
        """What the run loads from a pretraining run (minimodels/train/run.py): the LM, from model.init_from."""
        return {"backbone": self.config.init_from}

    def train(self, mode: bool = True):
        """A frozen LM stays in eval mode (no dropout) while the prompts train; a tuned one trains as they do."""
        super().train(mode)
        if not self.config.tune_lm:
            self.backbone.eval()
        return self

    def forward(self, input_ids: torch.Tensor, prompt_index: torch.Tensor, relation: torch.Tensor,
                labels: torch.Tensor | None = None, padding_mask: torch.Tensor | None = None,
                blanks: torch.Tensor | None = None, verbalizers: torch.Tensor | None = None,
                class_labels: torch.Tensor | None = None) -> PTuningOutput:
        """input_ids, prompt_index, labels, padding_mask (B, T) and relation (B,), from the kb_probe task:
        prompt_index[b, t] = i where position t holds pseudo token [P_i], else -1; labels hold the object's id
        at its one position per row (BERT: the [MASK]; GPT: the object token itself, scored from t - 1).
        Without labels there is no loss, and the logits are the LM's at every position (GPT: of the next token).
        A cloze (package_ptuning, BERT only) has no labels but blanks, verbalizers and class_labels (BERT.forward)."""
        emb = self.backbone.tok_emb(input_ids)  # (B, T, C): e(x_t)
        prompts = torch.stack([encode() for encode in self.prompts])[relation]  # (R, n, C) -> (B, n, C)
        is_prompt = prompt_index >= 0  # (B, T)
        h = prompts.gather(1, prompt_index.clamp(min=0)[..., None].expand_as(emb))  # (B, T, C): h_{prompt_index}
        emb = torch.where(is_prompt[..., None], h.to(emb.dtype), emb)  # pseudo tokens take h_i, the rest e(x_t)
        prefix = None
        if self.config.deep:
            per_layer = self.prefix[relation].unbind(1)  # L x (B, 2, nh, n, hs)
            prefix = [LayerCache(KV(*kv.unbind(1))) for kv in per_layer]  # L x keys and values, each (B, nh, n, hs)
        return self.score(input_ids, labels, padding_mask, emb, prefix, blanks, verbalizers, class_labels)

    def score(self, input_ids, labels=None, padding_mask=None, inputs_embeds=None, prefix=None, blanks=None,
              verbalizers=None, class_labels=None) -> PTuningOutput:
        """Run the LM and return its scores for the object slot (B, V) and the loss; without labels, its scores
        at every position (B, T, V); with blanks, the cloze's (BERT.forward). Also scores manual prompts
        (scripts/probe.py): then there are no inputs_embeds and no prefix."""
        if self.causal:
            # the prefixes are keys and values, not tokens: the real tokens keep positions 0 .. T - 1
            positions = torch.arange(input_ids.size(1), device=input_ids.device)  # (T,)
            out = self.backbone(input_ids, labels=labels, inputs_embeds=inputs_embeds, cache=prefix,
                                position_ids=positions)
            logits = out.logits  # (B, T, V)
            if labels is not None:  # the object at position t is predicted by the logits at t - 1 (next-token shift)
                target = (labels != -100).int().argmax(dim=1)  # (B,)
                logits = logits[torch.arange(len(labels)), target - 1]  # (B, V)
            class_scores = None  # a cloze needs the blanks of a masked LM
        else:
            out = self.backbone(input_ids, padding_mask=padding_mask, labels=labels, inputs_embeds=inputs_embeds,
                                cache=prefix, blanks=blanks, verbalizers=verbalizers, class_labels=class_labels)
            logits = out.logits if labels is None else out.masked_logits  # (B, T or K, V), or (B, V): one label per row
            class_scores = out.class_scores
        if labels is not None and len(logits) != len(labels):
            raise ValueError(f"labels: expected one object per example, got {len(logits)} for {len(labels)} examples")
        return PTuningOutput(logits=logits, loss=out.loss, class_scores=class_scores)

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

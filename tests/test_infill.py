"""scripts/infill.py's fills on tiny random models and the records benchmark: every arch fills every blank with
text of its own vocabulary (no mask, [eop] or sentinel leaks into a fill), and BERT not told the length keeps the
number of [MASK] tokens whose fill is likeliest per piece."""

import math

import pytest
import torch

from conftest import load_script
from minimodels.data import train_tokenizer
from minimodels.data.blank_infilling import EOP, MASK_TOKENS, SOP
from minimodels.data.records import held_out_blanks, records_corpus
from minimodels.data.span_corruption import SENTINEL
from minimodels.models.bert import BERT, BERTConfig
from minimodels.models.glm import GLM, GLMConfig
from minimodels.models.gpt import GPT, GPTConfig
from minimodels.models.t5 import T5, T5Config

infill = load_script("infill")

BLANKS = held_out_blanks(8)
SIZE = dict(n_layer=1, n_head=2, d_model=32)


@pytest.fixture(scope="module")
def tokenizers():
    docs = records_corpus()["train"][:300]
    bpe = train_tokenizer("bpe", docs, 300)
    bpe.add_special_tokens([*MASK_TOKENS.values(), SOP, EOP, SENTINEL.format(0), SENTINEL.format(1)])
    return bpe, train_tokenizer("wordpiece", docs, 300)


def models(bpe, wordpiece) -> dict:
    torch.manual_seed(0)
    return {"glm": (GLM(GLMConfig(vocab_size=bpe.vocab_size, block_size=128, **SIZE)), bpe),
            "t5": (T5(T5Config(vocab_size=bpe.vocab_size, d_model=32, n_layer=1, n_head=2, d_ff=64)), bpe),
            "gpt": (GPT(GPTConfig(vocab_size=bpe.vocab_size, block_size=128, **SIZE)), bpe),
            "bert": (BERT(BERTConfig(vocab_size=wordpiece.vocab_size, block_size=128, head="mlm", **SIZE)), wordpiece)}


@torch.no_grad()
def test_every_arch_fills_every_blank_with_plain_text(tokenizers):
    for arch, (model, tok) in models(*tokenizers).items():
        model.eval()
        for suffix, fill, told in infill.FILL[arch]:
            fill = fill if told or arch != "bert" else lambda *a: infill.fill_bert_not_told(*a, max_masks=4)
            for before, answer, after in BLANKS:
                text, answer_nats = fill(model, tok, before, after, answer, "cpu")
                assert not any(tok.backend.id_to_token(i) in text for i in tok.special_ids), (arch + suffix, text)
                assert (answer_nats is None) == (arch == "bert" and not told)
                assert answer_nats is None or answer_nats > 0 and math.isfinite(answer_nats)


@torch.no_grad()
def test_bert_not_told_keeps_the_length_whose_fill_is_likeliest_per_piece(tokenizers):
    model, tok = models(*tokenizers)["bert"]
    model.eval()
    for before, answer, after in BLANKS:
        scored = []  # (mean log-probability of the argmax pieces, their text) for 1..4 masks, the naive way
        for k in range(1, 5):
            ids = [tok.cls_id] + tok.encode(before) + [tok.mask_id] * k + tok.encode(after) + [tok.sep_id]
            at = [t for t, i in enumerate(ids) if i == tok.mask_id]
            logp = model(torch.tensor([ids])).logits[0, at].log_softmax(-1)  # (k, V)
            scored.append((logp.max(-1).values.mean().item(), tok.decode(logp.argmax(-1).tolist())))
        assert infill.fill_bert_not_told(model, tok, before, after, answer, "cpu", max_masks=4)[0] == max(scored)[1]
        one_piece = tok.decode(tok.encode(answer)[:1])  # told one piece: the one-mask fill
        assert infill.fill_bert(model, tok, before, after, one_piece, "cpu")[0] == scored[0][1]

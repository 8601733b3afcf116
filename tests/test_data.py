"""Tests for minimodels.data: corpora, tokenizers, the causal collator and LMTask (no network)."""

import json
import math
from types import SimpleNamespace

import pytest
import torch

from minimodels.config import DataConfig
from minimodels.data import DataError, LMTask, Tokenizer, build_task, load_corpus, train_tokenizer
from minimodels.data.collate import CausalLMCollator
from minimodels.data.corpus import extract_docstrings, split_records, stdlib_records
from minimodels.data.tasks import encode_stream, unigram_baseline
from minimodels.train.trainer import val_batches

TRICKY = "Héllo wörld — naïve café 日本語 😀\n\n\tindented line\r\nlast  line  "
DOCS = [f"Document number {i} says hello to the wörld.\nIt has a second line, {i * 7}." for i in range(40)]


@pytest.fixture(scope="module")
def stdlib(tmp_path_factory):
    """stdlib docstring records, extracted once into a temporary cache (a few seconds)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MINIMODELS_CACHE", str(tmp_path_factory.mktemp("cache")))
        records = stdlib_records()
        cached = stdlib_records()  # second call reads the JSON cache
        corpus = load_corpus(DataConfig(source="stdlib"))
    return records, cached, corpus


# --------------------------------------------------------------------------- corpora


def test_docstrings_carry_qualified_names_in_file_order(tmp_path):
    src = tmp_path / "m.py"
    src.write_text('''"""Module doc."""
class A:
    """Class A."""
    def f(self):
        """Method f."""
        def inner():
            """Inner."""
    def undocumented(self):
        pass
if True:
    async def g():
        """Coroutine g, defined inside an if."""
''')
    assert extract_docstrings(src) == [("", "Module doc."), ("A", "Class A."), ("A.f", "Method f."),
                                       ("A.f.inner", "Inner."), ("g", "Coroutine g, defined inside an if.")]


def test_stdlib_corpus_split_by_file(stdlib):
    records, cached, corpus = stdlib
    assert cached == records
    assert sum(len(r["text"]) for r in records) > 1_000_000  # ~1.8 MB of docstrings
    assert not any("/test/" in "/" + r["path"] or "site-packages" in r["path"] for r in records)
    split = split_records(records, 0.1)
    train_files = {r["path"] for r in split["train"]}
    val_files = {r["path"] for r in split["val"]}
    assert not train_files & val_files
    assert 0.03 < len(val_files) / (len(train_files) + len(val_files)) < 0.2
    assert split_records(records, 0.1) == split  # deterministic
    assert corpus == {name: [r["text"] for r in recs] for name, recs in split.items()}


def test_stdlib_code_is_the_source_files_split_by_file():
    from minimodels.data.corpus import stdlib_files
    corpus = load_corpus(DataConfig(source="stdlib_code"))
    root, files = stdlib_files()
    json_decoder = (root / "json" / "decoder.py").read_text(encoding="utf-8")
    assert json_decoder in corpus["train"] + corpus["val"]  # a whole file is one document
    texts = {f.read_text("utf-8", "replace") for f in files}
    assert sorted(corpus["train"] + corpus["val"]) == sorted(t for t in texts if t.strip())  # each text once
    assert not any("/test/" in "/" + f.relative_to(root).as_posix() for f in files)
    assert not set(corpus["train"]) & set(corpus["val"])
    assert sum(map(len, corpus["train"] + corpus["val"])) > 5_000_000  # several times the ~1.8 MB of docstrings
    assert load_corpus(DataConfig(source="stdlib_code")) == corpus  # deterministic


def test_txt_file_paragraphs(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("\n\n".join(DOCS) + "\n\n   \n")
    corpus = load_corpus(DataConfig(source=str(path), val_fraction=0.2))
    assert sorted(corpus["train"] + corpus["val"]) == sorted(DOCS)  # one document per paragraph, by index
    assert corpus["val"] and corpus["train"]
    assert load_corpus(DataConfig(source=str(path), val_fraction=0.2)) == corpus


def test_json_and_jsonl_sources(tmp_path):
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("\n".join(json.dumps({"body": d, "id": i}) for i, d in enumerate(DOCS)))
    corpus = load_corpus(DataConfig(source=str(jsonl), text_field="body"))
    assert sorted(corpus["train"] + corpus["val"]) == sorted(DOCS)
    as_list = tmp_path / "docs.json"
    as_list.write_text(json.dumps(DOCS))
    assert load_corpus(DataConfig(source=str(as_list))) == corpus  # same split rule: by document index
    with pytest.raises(DataError, match=r"data.text_field: no field 'text' in line 1 of .*docs.jsonl"):
        load_corpus(DataConfig(source=str(jsonl)))


def test_folder_split_by_file(tmp_path):
    for i in range(30):
        sub = tmp_path / f"part{i % 3}"
        sub.mkdir(exist_ok=True)
        (sub / f"f{i}.txt").write_text(f"file {i} first paragraph\n\nfile {i} second paragraph")
    (tmp_path / "ignored.csv").write_text("a,b")
    corpus = load_corpus(DataConfig(source=str(tmp_path), val_fraction=0.3))
    file_of = lambda doc: doc.split()[1]  # noqa: E731
    assert {file_of(d) for d in corpus["train"]}.isdisjoint(file_of(d) for d in corpus["val"])
    assert len(corpus["train"]) + len(corpus["val"]) == 60


def test_source_errors(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="data.source: file or folder 'missing.txt' not found"):
        load_corpus(DataConfig(source="missing.txt"))
    one = tmp_path / "one.txt"
    one.write_text("a single paragraph")
    with pytest.raises(DataError, match="data.source: .*one.txt holds 1 document"):
        load_corpus(DataConfig(source=str(one)))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="data.source: .*bad.json is not valid JSON"):
        load_corpus(DataConfig(source=str(bad)))

    # a Hugging Face name that cannot be loaded: the (faked, offline) loader fails
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the hub\nmore details")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"^data.source: 'someone/corpus' is not a local file or folder, .*Couldn't reach the hub$"):
        load_corpus(DataConfig(source="someone/corpus"))


def test_hugging_face_dataset_splits(monkeypatch):
    import datasets

    def fake_load(name, subset):
        assert (name, subset) == ("fake/ds", "sub")
        splits = {"train": datasets.Dataset.from_dict({"text": DOCS + [""]})}
        if with_validation:
            splits["validation"] = datasets.Dataset.from_dict({"text": ["held out", "  "]})
        return datasets.DatasetDict(splits)

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    with_validation = True
    assert load_corpus(DataConfig(source="fake/ds", hf_subset="sub")) == {"train": DOCS, "val": ["held out"]}
    with_validation = False
    corpus = load_corpus(DataConfig(source="fake/ds", hf_subset="sub"))
    assert sorted(corpus["train"] + corpus["val"]) == sorted(DOCS) and corpus["val"]
    with pytest.raises(DataError, match="data.text_field: no column 'body'"):
        load_corpus(DataConfig(source="fake/ds", hf_subset="sub", text_field="body"))


# --------------------------------------------------------------------------- tokenizers


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_exact_round_trip(kind):
    texts = DOCS + ([TRICKY] if kind == "char" else [])  # char only knows characters it has seen
    tok = train_tokenizer(kind, texts, vocab_size=300)
    assert tok.kind == kind
    for text in [TRICKY, DOCS[3], ""]:
        assert tok.decode(tok.encode(text)) == text
    assert tok.eos_id not in tok.encode(TRICKY)  # encode adds no special tokens
    assert {tok.pad_id, tok.eos_id} <= tok.special_ids
    assert tok.mask_id is None and tok.cls_id is None and tok.sep_id is None


def test_char_tokenizer_vocab():
    tok = train_tokenizer("char", ["abc", "cab\n"], vocab_size=999)
    assert tok.vocab_size == 3 + 4  # pad, eos, unk + a b c \n
    assert len(tok.encode("abcab")) == 5
    assert tok.encode("z") == [tok.token_id("unk")]  # unseen character


def test_wordpiece_lowercases_and_has_bert_specials():
    tok = train_tokenizer("wordpiece", DOCS, vocab_size=200)
    assert tok.decode(tok.encode("Hello WÖRLD")) == "hello world"
    assert [tok.pad_id, tok.cls_id, tok.sep_id, tok.mask_id] == [0, 2, 3, 4]
    assert tok.eos_id == tok.sep_id and tok.special_ids == {0, 1, 2, 3, 4}


@pytest.mark.parametrize("kind", ["char", "bpe", "wordpiece"])
def test_save_load_and_extra_specials(tmp_path, kind):
    tok = train_tokenizer(kind, DOCS + [TRICKY], vocab_size=300)
    tok.save(tmp_path / "tokenizer.json")
    loaded = Tokenizer.load(tmp_path / "tokenizer.json")
    assert loaded.kind == kind and loaded.vocab_size == tok.vocab_size
    assert loaded.encode(TRICKY) == tok.encode(TRICKY)
    assert loaded.encode_batch(DOCS[:3]) == [tok.encode(d) for d in DOCS[:3]]

    size = tok.vocab_size
    ids = tok.add_special_tokens(["<extra_id_0>", "<extra_id_1>"])
    assert ids == [size, size + 1] and tok.vocab_size == size + 2
    assert set(ids) <= tok.special_ids
    text = "hello <extra_id_1> world"
    assert ids[1] in tok.encode(text)  # never split
    assert "<extra_id_1>" not in tok.decode(tok.encode(text))


# --------------------------------------------------------------------------- collator and task


def test_causal_collator_pads_with_ignore_index():
    batch = CausalLMCollator(pad_id=0)([torch.tensor([5, 6, 7]), [8, 9]], torch.Generator())
    assert set(batch) == {"input_ids", "labels"}
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert batch["labels"].tolist() == [[5, 6, 7], [8, 9, -100]]
    assert batch["input_ids"].dtype == torch.long


@pytest.mark.parametrize("kind", ["char", "bpe", "wordpiece"])
def test_stream_chars_add_up(kind):
    docs = DOCS[:5] + [TRICKY]
    tok = train_tokenizer(kind, DOCS, vocab_size=300)
    ids, chars = encode_stream(tok, docs)
    assert (ids == tok.eos_id).sum() == len(docs)  # eos after every document
    assert int(chars.sum()) == sum(len(d) + 1 for d in docs)


class UniformLM(torch.nn.Module):
    """Predicts every token with probability 1/V: the loss is exactly ln V."""

    def __init__(self, vocab_size: int, block_size: int = 16):
        super().__init__()
        self.vocab_size = vocab_size
        self.config = SimpleNamespace(block_size=block_size)
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, labels=None):
        B, T = input_ids.shape
        return SimpleNamespace(logits=torch.zeros(B, T, self.vocab_size) + self.dummy)

    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None):
        new = torch.randint(3, self.vocab_size, (1, max_new_tokens), generator=generator)
        return torch.cat([idx, new], dim=1)


def make_task(kind: str, seq_len: int, random_offset: bool = False) -> LMTask:
    corpus = {"train": DOCS[:30], "val": DOCS[30:] + [TRICKY]}
    return LMTask(train_tokenizer(kind, corpus["train"], 300), corpus, seq_len, DataConfig(random_offset=random_offset))


def test_lm_task_windows():
    task = make_task("bpe", seq_len=16)
    assert len(task.train) == len(task.train_stream) // 16
    assert all(len(task.train[i]) == 16 for i in range(len(task.train)))
    assert task.train[1].tolist() == task.train_stream[16:32].tolist() and task.train[0].dtype == torch.long
    assert torch.cat([task.val[i] for i in range(len(task.val))]).tolist() == task.val_stream.tolist()
    assert task.model_overrides() == {"vocab_size": task.tokenizer.vocab_size}
    batches = list(val_batches(task, 4))
    assert sum(len(b["input_ids"]) for b in batches) == len(task.val)
    assert (batches[-1]["labels"] == -100).any()  # the last, shorter window is padded


def test_random_offset_windows():
    """data.random_offset: each draw of train example i is a full window inside stream[i*T : (i+2)*T - 1],
    starting at every offset 0..T-1 over many draws; val windows stay as without it."""
    plain, task = make_task("bpe", seq_len=16), make_task("bpe", seq_len=16, random_offset=True)
    stream, T = task.train_stream.tolist(), 16
    assert len(task.train) == (len(stream) - (T - 1)) // T and len(task.train[3]) == 2 * T - 1
    starts = set()
    for seed in range(200):
        batch = task.collate([task.train[3]], torch.Generator().manual_seed(seed))
        window = batch["input_ids"][0].tolist()
        assert len(window) == T and (batch["labels"] != -100).all()
        start = next(s for s in range(3 * T, 4 * T) if stream[s:s + T] == window)
        starts.add(start - 3 * T)
    assert starts == set(range(T))
    same = task.collate([task.train[3]], torch.Generator().manual_seed(7))["input_ids"]
    assert torch.equal(same, task.collate([task.train[3]], torch.Generator().manual_seed(7))["input_ids"])
    assert [plain.val[i].tolist() for i in range(len(plain.val))] == [task.val[i].tolist() for i in range(len(task.val))]
    val = task.collate([task.val[0], task.val[1]], torch.Generator().manual_seed(0))["input_ids"]
    assert val.tolist() == [task.val[0].tolist(), task.val[1].tolist()]  # val windows are never cropped


def test_evaluate_bits_per_character():
    # char tokenizer: every token is one character (eos = one document break) -> bpc = log2(V)
    task = make_task("char", seq_len=32)
    V = task.tokenizer.vocab_size
    metrics = task.evaluate(UniformLM(V), val_batches(task, 8))
    assert metrics["val_loss"] == pytest.approx(math.log(V))
    assert metrics["val_bpc"] == pytest.approx(math.log2(V))
    assert metrics["val_ppl"] == pytest.approx(V)

    # bpe, one window holding the whole val stream: tokens 1.. are predicted, so the characters
    # are all of the val text (+1 per document) minus those of the first token
    task = make_task("bpe", seq_len=600)
    V, stream = task.tokenizer.vocab_size, task.val_stream.tolist()
    assert len(task.val) == 1 and len(stream) < 600
    chars = sum(len(d) + 1 for d in DOCS[30:] + [TRICKY]) - len(task.tokenizer.decode(stream[:1]))
    metrics = task.evaluate(UniformLM(V), val_batches(task, 8))
    assert metrics["val_bpc"] == pytest.approx(math.log(V) / math.log(2) * (len(stream) - 1) / chars)

    # a capped evaluation counts only the windows it saw
    task = make_task("bpe", seq_len=8)
    metrics = task.evaluate(UniformLM(V), val_batches(task, 2, max_batches=3))
    seen = [task.val[i].tolist() for i in range(6)]
    chars = sum(len(task.tokenizer.decode(w[1:], skip_special_tokens=False).replace("<|endoftext|>", "#")) for w in seen)
    assert metrics["val_bpc"] == pytest.approx(math.log2(V) * sum(len(w) - 1 for w in seen) / chars)


def test_unigram_baseline():
    train, val = torch.tensor([0, 0, 1]), torch.tensor([0, 1])
    p = torch.tensor([3 / 6, 2 / 6])  # add-one counts 3, 2, 1 over V = 3
    expected = -(p.log().sum().item())
    got = unigram_baseline(train, val, val_chars=4, vocab_size=3)
    assert got["val_loss"] == pytest.approx(expected / 2)
    assert got["val_bpc"] == pytest.approx(expected / math.log(2) / 4)


def test_sample():
    task = make_task("bpe", seq_len=16)
    model = UniformLM(task.tokenizer.vocab_size, block_size=16)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    text = task.sample(model, "Document number", max_new_tokens=5, generator=g())
    assert text.startswith("Document number") and text == task.sample(model, "Document number", 5, generator=g())
    assert isinstance(task.sample(model, "", max_new_tokens=5, generator=g()), str)
    with pytest.raises(ValueError, match="block_size=16"):
        task.sample(model, DOCS[0] * 3, max_new_tokens=1)


def test_build_task_trains_then_reuses_tokenizer(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("\n\n".join(DOCS))
    cfg = DataConfig(source=str(path), tokenizer="bpe", vocab_size=300)
    task = build_task(cfg, seq_len=16, tokenizer_path=tmp_path / "run" / "tokenizer.json")
    assert (tmp_path / "run" / "tokenizer.json").is_file()
    again = build_task(cfg, seq_len=16, tokenizer_path=tmp_path / "run" / "tokenizer.json")
    assert again.train_stream.tolist() == task.train_stream.tolist()
    with pytest.raises(DataError, match="data.tokenizer: is 'char'"):
        build_task(DataConfig(source=str(path), tokenizer="char"), 16, tmp_path / "run" / "tokenizer.json")

"""BriVL / CLIP: the queue, the momentum update, the losses, recall@K, the towers, and the shapes data."""

import copy
import dataclasses
import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minimodels.config import ConfigError, load_config
from minimodels.data import shapes
from minimodels.data.shapes import (COLOURS, SEEN_PAIRS, UNSEEN, Phrase, chance_of_hit, description,
                                    is_true_of, make_split, parse_caption, recall_metrics, retrieval_ranks,
                                    sample_caption)
from minimodels.models.bert import BERTConfig
from minimodels.models.brivl import (BriVL, BriVLConfig, ContrastiveConfig, contrastive_loss, crop_regions, enqueue,
                                     info_nce)


def tiny(kind="momentum_queue", queue_size=8, momentum=0.9, regions=True, vocab_size=20, text_init_from=None):
    cfg = BriVLConfig(vocab_size=vocab_size, n_layer=1, d_model=32, n_head=2, embed_dim=16, regions=regions,
                      text=BERTConfig(head="none", n_layer=1, d_model=32, n_head=2, block_size=16, dropout=0.0,
                                      init_from=text_init_from),
                      contrastive=ContrastiveConfig(kind=kind, queue_size=queue_size, momentum=momentum,
                                                  learn_temperature=kind == "inbatch"))  # as the configs
    torch.manual_seed(0)
    return BriVL(cfg)


def batch(B=4, T=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0y0 = torch.rand(B, 3, 2, generator=g) * 0.5
    box_mask = torch.arange(3) < torch.tensor([1, 2, 3, 2][:B] + [3] * max(0, B - 4))[:, None]
    return {"images": torch.randn(B, 3, 32, 32, generator=g), "boxes": torch.cat([x0y0, x0y0 + 0.3], -1),
            "box_mask": box_mask, "input_ids": torch.randint(0, 20, (B, T), generator=g),
            "padding_mask": (torch.arange(T) < torch.tensor([6, 4, 5, 3][:B] + [6] * max(0, B - 4))[:, None]).long()}


# --------------------------------------------------------------------------- queue and momentum


def test_queue_is_fifo_and_wraps():
    K = 5
    queue, ptr = torch.full((K, 1), -1.0), 0
    pushed = []
    for start in range(0, 8, 2):  # batches (0, 1), (2, 3), (4, 5), (6, 7): the third one wraps
        keys = torch.tensor([[start], [start + 1.0]])
        ptr = enqueue(queue, ptr, keys)
        pushed += keys.flatten().tolist()
    assert ptr == 8 % K
    assert queue.flatten().tolist() == [5, 6, 7, 3, 4]  # slot = position of the key mod K
    assert torch.roll(queue, -ptr).flatten().tolist() == pushed[-K:]  # from ptr on: oldest to newest
    ptr = enqueue(queue, ptr, torch.arange(10.0, 17.0)[:, None])  # a batch longer than the queue: its last K keys
    assert sorted(queue.flatten().tolist()) == [12, 13, 14, 15, 16] and torch.roll(queue, -ptr).flatten().tolist() == [12, 13, 14, 15, 16]


def test_model_queues_fill_then_stay_full_and_eval_leaves_them_alone():
    model = tiny(queue_size=6).train()
    b = batch(B=4)
    model(**b)
    assert int(model.queue_filled) == 4 and int(model.queue_ptr) == 4
    model(**b)
    assert int(model.queue_filled) == 6 and int(model.queue_ptr) == 2
    before = model.image_queue.clone(), model.text_queue.clone(), int(model.momentum_steps)
    model.eval()
    model(**b)
    assert torch.equal(before[0], model.image_queue) and torch.equal(before[1], model.text_queue)
    assert int(model.momentum_steps) == before[2]
    # the keys are the momentum towers' embeddings: unit norm, the last batch at slots 4, 5, 0, 1
    assert torch.allclose(model.text_queue.norm(dim=-1), torch.ones(6), atol=1e-5)
    with torch.no_grad():
        k = model.text_m(b["input_ids"], b["padding_mask"])
    assert torch.allclose(model.text_queue[[4, 5, 0, 1]], k, atol=1e-6)


def test_momentum_update_is_the_formula():
    model = tiny(momentum=0.9)
    model.train()
    model.momentum_update()  # the first update copies the query towers
    pairs = list(zip([*model.image.parameters(), *model.text.parameters()],
                     [*model.image_m.parameters(), *model.text_m.parameters()]))
    assert all(torch.equal(q, k) for q, k in pairs)
    with torch.no_grad():  # move the query towers away, so that theta_k and theta_q differ
        for q, _ in pairs:
            q.add_(torch.randn_like(q))
    before = [(q.clone(), k.clone()) for q, k in pairs]
    model.momentum_update()
    for (q, k), (q0, k0) in zip(pairs, before):
        assert torch.allclose(k, 0.9 * k0 + 0.1 * q0, atol=1e-6)
        assert torch.equal(q, q0)  # the query towers are not touched


def test_no_gradient_reaches_the_momentum_towers_or_the_queues():
    model = tiny(queue_size=16).train()
    for seed in range(3):  # after the first step the queue holds keys and enters the loss
        out = model(**batch(seed=seed))
        out.loss.backward()
    assert all(not p.requires_grad and p.grad is None for p in [*model.image_m.parameters(), *model.text_m.parameters()])
    assert not model.image_queue.requires_grad and not model.text_queue.requires_grad
    assert all(p.grad is not None for p in model.image.parameters())  # ... but it reaches the query towers
    assert model.log_scale.grad is None and not model.log_scale.requires_grad  # BriVL: a fixed temperature
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith(("image_m.", "text_m.")) for n in trained)


# --------------------------------------------------------------------------- losses


def test_info_nce_equals_the_closed_form():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(3, 4, generator=g), torch.randn(5, 4, generator=g)
    expected = -sum(math.log(math.exp(2 * q[i] @ k[i]) / sum(math.exp(2 * q[i] @ k[j]) for j in range(5)))
                    for i in range(3)) / 3
    assert info_nce(q, k, torch.tensor(2.0)).item() == pytest.approx(expected, rel=1e-5)


def test_loss_directions_swap_when_image_and_text_are_swapped():
    g = torch.Generator().manual_seed(1)
    v, t, vk, tk, qv, qt = (torch.nn.functional.normalize(torch.randn(n, 8, generator=g), dim=-1) for n in (4, 4, 4, 4, 6, 6))
    s = torch.tensor(1 / 0.07)
    i2t, t2i = contrastive_loss(v, t, v, t, s)  # CLIP: the keys are the batch itself
    assert i2t.item() != pytest.approx(t2i.item())  # the two directions differ on this batch ...
    assert contrastive_loss(t, v, t, v, s) == (t2i, i2t)  # ... and exchange places when the modalities do
    i2t, t2i = contrastive_loss(v, t, torch.cat([vk, qv]), torch.cat([tk, qt]), s)  # BriVL: keys, then the queue
    assert i2t.item() != pytest.approx(t2i.item())
    swapped = contrastive_loss(t, v, torch.cat([tk, qt]), torch.cat([vk, qv]), s)
    assert torch.equal(swapped[0], t2i) and torch.equal(swapped[1], i2t)


def test_a_slice_of_the_batch_scored_against_all_keys_averages_to_the_whole_batch_loss():
    """Under torchrun process r scores its rows r*B .. (r+1)*B - 1 against the gathered keys: the mean of
    the processes' losses is the loss of one process holding the whole batch, with and without a queue."""
    g = torch.Generator().manual_seed(2)
    v, t, qv, qt = (torch.nn.functional.normalize(torch.randn(n, 8, generator=g), dim=-1) for n in (6, 6, 5, 5))
    s = torch.tensor(1 / 0.07)
    for keys in [(v, t), (torch.cat([v, qv]), torch.cat([t, qt]))]:
        whole = torch.stack(contrastive_loss(v, t, *keys, s))
        parts = [torch.stack(contrastive_loss(v[r * 2:(r + 1) * 2], t[r * 2:(r + 1) * 2], *keys, s, first=r * 2))
                 for r in range(3)]
        torch.testing.assert_close(sum(parts) / 3, whole, rtol=1e-6, atol=0)
        assert not torch.allclose(parts[0], whole)  # each share differs from the mean


def test_temperature_is_learned_and_clamped_at_100():
    model = tiny(kind="inbatch").train()
    assert model.log_scale.requires_grad and model.log_scale.exp().item() == pytest.approx(1 / 0.07)
    with torch.no_grad():
        model.log_scale.fill_(math.log(1000.0))
    assert model(**batch()).metrics["logit_scale"].item() == pytest.approx(100.0)


# --------------------------------------------------------------------------- recall


def test_recall_on_a_constructed_similarity_matrix():
    sim = torch.tensor([[0.9, 0.1, 0.5, 0.0],    # query 0: its item 0 is ranked 1
                        [0.8, 0.2, 0.7, 0.3],    # query 1: item 1 has 3 above it -> rank 4
                        [0.1, 0.6, 0.4, 0.2],    # query 2: item 2 has 1 above it -> rank 2
                        [0.5, 0.6, 0.7, 0.1]])   # query 3: item 3 has 3 above it -> rank 4
    paired = torch.eye(4, dtype=torch.bool)
    assert retrieval_ranks(sim, paired).tolist() == [1, 4, 2, 4]
    m = recall_metrics("t2i", sim, paired, ks=(1, 2, 4))
    assert m == {"t2i_r1": 0.25, "t2i_r2": 0.5, "t2i_r4": 1.0, "t2i_mean_rank": 2.75, "t2i_median_rank": 2.0}
    # semantic: query 1 is also true of item 0 (rank 1), query 3 of item 2 (rank 1)
    true_of = paired | torch.tensor([[0, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0]], dtype=torch.bool)
    assert retrieval_ranks(sim, true_of).tolist() == [1, 1, 2, 1]
    # chance: one hit among 4 items -> k/4; two hits -> 1 - C(2, 1)/C(4, 1) = 1/2 at k = 1
    assert chance_of_hit(paired, 1) == pytest.approx(0.25)
    assert chance_of_hit(true_of, 1) == pytest.approx((0.25 + 0.5 + 0.25 + 0.5) / 4)


# --------------------------------------------------------------------------- towers


def test_embeddings_have_unit_norm_with_and_without_regions():
    for regions in (True, False):
        model = tiny(kind="inbatch", regions=regions).eval()
        out = model(**batch())
        for e in (out.image_embeds, out.text_embeds):
            assert e.shape == (4, 16) and torch.allclose(e.norm(dim=-1), torch.ones(4), atol=1e-5)


def test_crop_regions_samples_inside_the_box():
    # a feature map whose channel 0 is the x coordinate and channel 1 the y coordinate of each cell centre
    h = w = 8
    ys, xs = torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij")
    fmap = torch.stack([xs, ys])[None].repeat(2, 1, 1, 1)  # (2, 2, h, w)
    boxes = torch.tensor([[[0.25, 0.5, 0.75, 1.0], [0.0, 0.0, 0.5, 0.25]],
                          [[0.5, 0.25, 1.0, 0.75], [0.25, 0.25, 0.5, 0.5]]])  # (B=2, R=2, 4)
    centres = torch.stack([(boxes[..., 0] + boxes[..., 2]) / 2, (boxes[..., 1] + boxes[..., 3]) / 2], -1)
    assert torch.allclose(crop_regions(fmap, boxes, grid=2), centres, atol=1e-5)  # (B, R, 2): the box centres


def test_bad_configs_name_the_key(tmp_path):
    for override, fragment in [("model.contrastive.kind=moco", "model.contrastive.kind: must be one of inbatch, momentum_queue"),
                               ("model.contrastive.momentum=1.0", "model.contrastive.momentum: must be in [0, 1)"),
                               ("model.text.head=mlm", "model.text.head: the text tower is BERT's encoder"),
                               ("model.text.n_head=5", "model.text.d_model: 128 is not divisible by model.text.n_head=5"),
                               ("model.patch_size=5", "model.image_size: 32 is not divisible by model.patch_size=5"),
                               ("model.contrastive.queue_sise=3", "did you mean model.contrastive.queue_size?")]:
        with pytest.raises(ConfigError) as e:
            load_config("configs/brivl.yaml", [override])
        assert fragment in str(e.value), str(e.value)
    model = tiny(kind="inbatch")
    with pytest.raises(ValueError, match=r"images: expected \(B, 3, 32, 32\)"):
        model(**(batch() | {"images": torch.zeros(4, 3, 16, 16)}))


# --------------------------------------------------------------------------- the shapes data


def test_generator_is_deterministic_for_a_seed():
    a, b, c = make_split(30, 5, SEEN_PAIRS, captions=True), make_split(30, 5, SEEN_PAIRS, captions=True), make_split(30, 6, SEEN_PAIRS)
    assert torch.equal(a.images, b.images) and a.scenes == b.scenes and a.captions == b.captions
    assert not torch.equal(a.images, c.images)


def test_every_caption_is_true_of_its_image():
    split = make_split(200, 3, shapes.ALL_PAIRS)
    rng = random.Random(0)
    for image, scene in zip(split.images, split.scenes):
        for o in scene:  # the picture shows what the scene says: the object's colour at its centre
            pixel = image[:, int(o.cy), int(o.cx)].int()
            assert (pixel - torch.tensor(COLOURS[o.colour])).abs().max() <= 20, (o, pixel)
        for _ in range(5):
            caption = sample_caption(scene, rng)
            parsed = parse_caption(caption.text)  # read the words back, independently of how they were made
            assert parsed == caption, caption.text
            assert is_true_of(parsed, scene), (caption.text, scene)
            # and the check can fail: the same caption with another colour for its first object is false
            # whenever no object of the scene has that colour and shape
            p = parsed.phrases[0]
            other = next(c for c in COLOURS if all((c, p.shape) != (o.colour, o.shape) for o in scene))
            assert not is_true_of(dataclasses.replace(parsed, phrases=(Phrase(other, p.shape, p.size),) + parsed.phrases[1:]), scene)


def test_relations_and_grammar_by_hand():
    O = shapes.Object
    scene = (O("red", "circle", "small", 5, 5), O("blue", "square", "large", 20, 25))  # red is up and to the left
    for text, truth in [("a red circle above a blue square", True), ("a small red disk over a big blue box", True),
                        ("a red circle below a blue square", False), ("a blue square under a red circle", True),
                        ("a large red circle", False), ("a red circle and a blue square", True),
                        ("there is a blue box", True), ("a red circle and a red circle", False)]:
        assert is_true_of(parse_caption(text), scene) is truth, text
    for bad in ("a red", "a circle", "a red circle near a blue square", "red circle above a blue square please"):
        with pytest.raises(ValueError, match="not a caption"):
            parse_caption(bad)


def test_splits_hold_out_pairs_and_the_gallery_is_distinct():
    train = make_split(300, shapes.TRAIN_SEED, SEEN_PAIRS)
    assert not any((o.colour, o.shape) in UNSEEN for s in train.scenes for o in s)
    gallery = shapes.gallery_split()  # the held-out split itself
    assert len({description(s) for s in gallery.scenes}) == len(gallery.scenes) == shapes.N_GALLERY
    assert any((o.colour, o.shape) in UNSEEN for s in gallery.scenes for o in s)
    assert all(parse_caption(c.text) == c and is_true_of(c, s) for c, s in zip(gallery.captions, gallery.scenes))


# --------------------------------------------------------------------------- both configs train


@pytest.mark.parametrize("name", ["brivl", "clip"])
def test_config_trains_a_few_steps(name, tmp_path, monkeypatch):
    from minimodels.train.checkpoint import latest_checkpoint, read_weights
    from minimodels.train.run import run

    monkeypatch.setattr(shapes, "N_TRAIN", 64)
    cfg = load_config(f"configs/{name}.yaml", ["train.max_steps=3", "train.batch_size=8", "train.eval_interval=3",
                                               "model.n_layer=1", "model.text.n_layer=1", f"output.dir={tmp_path}",
                                               "train.eval_batches=4", "output.plot=false"])
    metrics = run(cfg, quiet=True)
    assert 0 <= metrics["t2i_r1"] <= 1 and 0 <= metrics["zeroshot_shape_acc"] <= 1
    assert metrics["chance_r1"] == pytest.approx(1 / 32)  # eval_batches 4 x 8: a gallery of 32
    assert math.isfinite(metrics["val_loss"])
    weights = read_weights(latest_checkpoint(tmp_path))
    if name == "brivl":  # the queues are buffers: the checkpoint holds 3 steps x 8 keys
        assert int(weights["queue_filled"]) == 24 and weights["image_queue"][:24].norm(dim=-1).min() > 0.99
        r = subprocess.run([sys.executable, "scripts/search.py", str(tmp_path), "a red circle", "--top", "3"],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        assert '"a red circle" is true of' in r.stdout and len(r.stdout.splitlines()) == 6  # cache note, truth, 3 rows, grid
        assert (tmp_path / "search.png").is_file() and (tmp_path / "gallery_embeddings.pt").is_file()
        r = subprocess.run([sys.executable, "scripts/generate.py", str(tmp_path)], capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and "search it with python scripts/search.py" in r.stderr


def test_text_tower_starts_from_a_bert_run(tmp_path):
    from minimodels.data.tokenizer import train_tokenizer
    from minimodels.models.bert import BERT
    from minimodels.train.checkpoint import save_checkpoint
    from minimodels.train.run import init_from_run, init_sources

    captions = [sample_caption(s, random.Random(0)).text for s in make_split(50, 0, SEEN_PAIRS).scenes]
    tok = train_tokenizer("wordpiece", captions, 64)
    for run_dir in ("bert_run", "brivl_run"):
        tok.save(tmp_path / run_dir / "tokenizer.json")
    torch.manual_seed(1)
    bert = BERT(BERTConfig(n_layer=1, d_model=32, n_head=2, block_size=16, vocab_size=tok.vocab_size))  # head mlm
    save_checkpoint(tmp_path / "bert_run", 1, bert, {}, keep_last=1)
    model = tiny(vocab_size=tok.vocab_size, text_init_from=str(tmp_path / "bert_run"))
    assert init_sources(model) == [("text.bert", str(tmp_path / "bert_run"))]
    for name, source in init_sources(model):
        init_from_run(model.get_submodule(name), Path(source), tmp_path / "brivl_run", quiet=True)
    pretrained = dict(bert.named_parameters())  # the MLM head has no place here
    shared = [n for n, _ in model.text.bert.named_parameters() if n in pretrained]
    assert len(shared) == len(list(model.text.bert.parameters()))  # the encoder alone: no pooler
    assert all(torch.equal(model.text.bert.get_parameter(n), pretrained[n]) for n in shared)
    assert not torch.equal(model.text_m.bert.tok_emb.weight, bert.tok_emb.weight)  # built before the loading ...
    model.momentum_update()  # ... so the first update copies the loaded weights into the momentum tower
    assert all(torch.equal(model.text_m.bert.get_parameter(n), pretrained[n]) for n in shared)


# --------------------------------------------------------------------------- the trainer: accumulation, resume

TINY = ["model.n_layer=1", "model.d_model=32", "model.n_head=2", "model.embed_dim=16", "model.text.n_layer=1",
        "model.text.d_model=32", "model.text.n_head=2", "train.dtype=fp32", "train.device=cpu", "output.plot=false",
        "train.batch_size=4", "train.log_interval=1", "train.eval_interval=100", "train.eval_batches=1"]


def trainer_for(name, tmp_path, *overrides):
    """A Trainer on configs/<name>.yaml, tiny, over 64 training scenes."""
    from minimodels.models import build_model
    from minimodels.train.run import prepare
    from minimodels.train.trainer import Trainer

    cfg = load_config(f"configs/{name}.yaml", [*TINY, f"output.dir={tmp_path}", *overrides])
    task = prepare(cfg, tmp_path)
    torch.manual_seed(0)
    return Trainer(build_model(cfg.model), task, cfg.train, tmp_path, quiet=True)


def query_and_key_towers(model):
    return [*model.image.parameters(), *model.text.parameters()], [*model.image_m.parameters(), *model.text_m.parameters()]


def test_momentum_update_runs_once_per_optimizer_step_under_grad_accum(tmp_path, monkeypatch):
    """grad_accum=2: after each optimizer step theta_k <- m theta_k + (1 - m) theta_q, once (not m^2), and the
    first keys came from a copy of the initial query towers: theta_k = m (m q0 + (1 - m) q1) + (1 - m) q2."""
    monkeypatch.setattr(shapes, "N_TRAIN", 64)
    t = trainer_for("brivl", tmp_path, "train.grad_accum=2", "model.contrastive.momentum=0.5", "train.warmup_steps=0")
    query, keys = query_and_key_towers(t.model)
    snapshots = [[q.detach().clone() for q in query]]
    for _ in range(2):
        t.train_step()
        snapshots.append([q.detach().clone() for q in query])
    q0, q1, q2 = snapshots
    assert int(t.model.momentum_steps) == 3  # the copy, then one update per optimizer step
    assert all((b - a).abs().max() > 1e-4 for a, b in zip(q1, q2))  # the query towers moved
    for k, a, b, c in zip(keys, q0, q1, q2):
        torch.testing.assert_close(k, 0.5 * (0.5 * a + 0.5 * b) + 0.5 * c, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["clip", "brivl"])
def test_grad_accum_is_the_mean_of_micro_batch_losses_not_one_big_batch(name, tmp_path, monkeypatch):
    """k = 2 micro-batches of 4: the gradient is that of (L(batch 1) + L(batch 2)) / 2, each scored against its
    own 4 in-batch keys (BriVL: and batch 1's keys in the queue for batch 2), not that of one batch of 8."""
    monkeypatch.setattr(shapes, "N_TRAIN", 64)
    t = trainer_for(name, tmp_path, "train.grad_accum=2", "train.grad_clip=0")
    model = copy.deepcopy(t.model)
    grads = {}
    zero_grad = t.optimizer.zero_grad
    monkeypatch.setattr(t.optimizer, "zero_grad", lambda **kw: (grads.update(
        {n: p.grad.clone() for n, p in t.model.named_parameters() if p.grad is not None}), zero_grad(**kw)))
    first, second = t.train_batch(0), t.train_batch(1)
    logged = t.train_step()["loss"]

    def gradient(batches):
        m = copy.deepcopy(model).train()
        losses = [m(**b).loss for b in batches]
        sum(losses).div(len(losses)).backward()
        return sum(losses).item() / len(losses), {n: p.grad for n, p in m.named_parameters() if p.grad is not None}

    loss, expected = gradient([first, second])
    assert logged == pytest.approx(loss, abs=1e-6)
    assert grads.keys() == expected.keys()
    for n in grads:
        torch.testing.assert_close(grads[n], expected[n], rtol=1e-4, atol=1e-7, msg=n)
    both = {k: torch.cat([first[k], second[k]]) for k in first if k not in ("input_ids", "padding_mask")}
    both |= text_batch_of(t.task, [first, second])
    big_loss, big = gradient([both])
    assert abs(big_loss - loss) > 1e-3 and (big["text.proj.2.weight"] - grads["text.proj.2.weight"]).abs().max() > 1e-4


def text_batch_of(task, batches):
    """input_ids and padding_mask of several batches as one, padded to the longest caption."""
    from minimodels.data.collate import pad_right

    rows = [ids[mask.bool()].tolist() for b in batches for ids, mask in zip(b["input_ids"], b["padding_mask"])]
    ids, real = pad_right(rows, task.tokenizer.pad_id)
    return {"input_ids": ids, "padding_mask": real.long()}


def test_a_killed_brivl_run_resumes_with_the_same_losses_and_queues(tmp_path, monkeypatch):
    """The queues, their pointer and the momentum towers are in the checkpoint: stopping after step 2 of 4 and
    resuming gives the uninterrupted run's losses and final state."""
    import shutil

    from minimodels.train.checkpoint import read_weights
    from minimodels.train.run import run

    monkeypatch.setattr(shapes, "N_TRAIN", 64)
    cfg = lambda out: load_config("configs/brivl.yaml", [*TINY, "train.max_steps=4", "train.save_interval=2",
                                                         "train.keep_last=5", f"output.dir={out}"])
    run(cfg(tmp_path / "full"), quiet=True)
    shutil.copytree(tmp_path / "full", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step_00000004")
    run(cfg(tmp_path / "resumed"), resume=True, quiet=True)
    losses = [[json.loads(line)["loss"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
               if "lr" in json.loads(line)] for name in ("full", "resumed")]
    assert len(losses[0]) == 4 and losses[1] == pytest.approx(losses[0], rel=0, abs=1e-6)
    a, b = (read_weights(tmp_path / name / "checkpoints" / "step_00000004") for name in ("full", "resumed"))
    assert int(a["queue_filled"]) == 16 and int(a["momentum_steps"]) == 5
    for k in ("image_queue", "text_queue", "queue_ptr", "text_m.proj.2.weight"):
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)

"""CogView in miniature (minimodels/data/text_to_image.py): the token layout and its loss mask, the image codes'
offset, sampling restricted to the image codes, the errors naming data.image_tokenizer / data.seq_len, and a tiny
VQ-VAE run, then a tiny cogview run through run(), then scripts/draw.py and `minimodels generate`; with a tiny CLIP
run, draw.py's reranking and scripts/judge_cogview.py (its shares in closed form, and on the tiny runs)."""

import json
import random
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import load_script, losses
from minimodels.config import ConfigError, load_config
from minimodels.data import DataError, shapes, train_tokenizer
from minimodels.data.scene_parser import parse_scene
from minimodels.data.text_to_image import BOI, ImageTokens, clip_similarity, longest_caption
from minimodels.models import GPT, GPTConfig
from minimodels.models.vqvae import VQVAE, VQVAEConfig
from minimodels.train.run import load_clip_run, load_drawing_run, load_image_tokenizer, load_run, run



draw, judge_cogview = load_script("draw"), load_script("judge_cogview")

VQ = ("model.channels=8", "model.n_res_block=1", "model.codebook_size=16", "model.code_dim=4", "train.batch_size=8",
      "train.max_steps=2", "train.eval_batches=1", "train.device=cpu", "output.plot=false")
GPT_TINY = ("model.n_layer=1", "model.d_model=32", "model.n_head=2", "train.batch_size=8", "train.max_steps=8",
            "train.warmup_steps=2", "train.eval_interval=8", "train.eval_batches=2", "train.log_interval=1",
            "train.device=cpu")


@pytest.fixture(scope="module")
def tokenizer():
    rng = random.Random(0)
    return train_tokenizer("wordpiece", [shapes.sample_caption(s, rng).text for s in shapes.gallery_split().scenes], 256)


@pytest.fixture(scope="module")
def vqvae():
    torch.manual_seed(0)
    return VQVAE(VQVAEConfig(channels=8, n_res_block=1, codebook_size=16, code_dim=4)).eval()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny VQ-VAE run, then a tiny cogview run on its codes (64 train scenes)."""
    root = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(shapes, "N_TRAIN", 64)
        run(load_config("configs/vqvae.yaml", [*VQ, f"output.dir={root / 'vqvae'}"]), quiet=True)
        cfg = load_config("configs/cogview.yaml", [*GPT_TINY, f"data.image_tokenizer={root / 'vqvae'}",
                                                   f"output.dir={root / 'cogview'}"])
        metrics = run(cfg, quiet=True)
    return root, metrics


def layout_of(tokenizer, vqvae, seq_len=86) -> ImageTokens:
    return ImageTokens.build(tokenizer, vqvae, seq_len)


def test_the_layout_pads_the_caption_on_the_left_and_offsets_the_codes(tokenizer, vqvae):
    layout = layout_of(tokenizer, vqvae)
    assert layout.boi_id == tokenizer.backend.token_to_id(BOI) == layout.offset - 1  # [BOI], then the K codes
    assert layout.offset == tokenizer.vocab_size and layout.side == 8 and layout.text_len == 86 - 1 - 64
    caption = tokenizer.encode("a small red circle above a big blue box")
    codes = torch.randint(16, (64,))
    input_ids, labels = layout.example(caption, codes)
    pads = layout.text_len - len(caption)
    assert input_ids.tolist() == [tokenizer.pad_id] * pads + caption + [layout.boi_id] + (codes + layout.offset).tolist()
    assert labels.tolist() == [-100] * (layout.text_len + 1) + (codes + layout.offset).tolist()  # image tokens only
    assert torch.equal(layout.codes(input_ids[None, layout.text_len + 1:]), codes.view(1, 8, 8))  # the round trip


def test_the_loss_covers_the_image_tokens_and_boi_predicts_the_first(tokenizer, vqvae):
    layout = layout_of(tokenizer, vqvae)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=layout.offset + 16, block_size=86, n_layer=1, n_head=2, d_model=32))
    captions = [tokenizer.encode("a red circle"), tokenizer.encode("there is a big green square left of a white disk")]
    input_ids, labels = map(torch.stack, zip(*[layout.example(c, torch.randint(16, (64,))) for c in captions]))
    out = model(input_ids, labels=labels)
    boi = layout.text_len  # the position of [BOI]
    # positions boi .. T-2 predict the 64 image tokens; the caption's positions and the last predict nothing
    expected = F.cross_entropy(out.logits[:, boi:-1].flatten(0, 1), input_ids[:, boi + 1:].flatten())
    torch.testing.assert_close(out.loss, expected)
    assert torch.equal(input_ids[:, boi + 1], labels[:, boi + 1])  # the first image token is BOI's target


def test_longest_caption_bounds_the_captions_and_a_short_seq_len_names_data_seq_len(tokenizer, vqvae):
    rng = random.Random(1)
    sampled = [shapes.sample_caption(s, rng).text for s in shapes.gallery_split().scenes for _ in range(3)]
    assert max(len(ids) for ids in tokenizer.encode_batch(sampled)) <= longest_caption(tokenizer)  # a bound
    need = longest_caption(tokenizer) + 1 + 64
    layout_of(tokenizer, vqvae, need)  # fits exactly
    with pytest.raises(DataError, match=f"^data.seq_len: .* at least {need}$"):
        layout_of(tokenizer, vqvae, need - 1)


def test_sampling_draws_only_image_codes_and_decodes_pictures(tokenizer, vqvae):
    layout = layout_of(tokenizer, vqvae)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=layout.offset + 16, block_size=86, n_layer=1, n_head=2, d_model=32))
    prompt = layout.prompt(tokenizer.encode("a red circle"))[None].repeat(4, 1)  # (4, text_len + 1)
    free = model.generate(prompt, 64, generator=torch.Generator().manual_seed(0))[:, prompt.shape[1]:]
    assert (free < layout.offset).any()  # unrestricted, an untrained model draws text tokens too
    ranged = model.generate(prompt, 64, generator=torch.Generator().manual_seed(0),
                            token_range=(layout.offset, layout.offset + 16))[:, prompt.shape[1]:]
    assert ((ranged >= layout.offset) & (ranged < layout.offset + 16)).all()
    greedy = model.generate(prompt[:1], 1, temperature=0, token_range=(layout.offset, layout.offset + 16))[0, -1]
    logits = model(prompt[:1]).logits[0, -1]
    assert greedy == layout.offset + logits[layout.offset:].argmax()  # the likeliest image code, not token
    images = layout.generate(model, vqvae, [tokenizer.encode("a red circle")] * 3, top_k=4,
                             generator=torch.Generator().manual_seed(0))
    assert images.shape == (3, 3, 32, 32) and images.dtype == torch.uint8


def test_data_image_tokenizer_must_be_a_trained_vqvae_run(tmp_path, runs):
    root, _ = runs
    with pytest.raises(ConfigError, match=f"^data.image_tokenizer: {tmp_path} is not a trained run folder"):
        load_image_tokenizer(tmp_path)
    with pytest.raises(ConfigError, match="^data.image_tokenizer: .*cogview is a gpt run, not a vqvae one$"):
        load_image_tokenizer(root / "cogview")


def test_a_tiny_run_trains_on_image_tokens_and_draws(runs, tmp_path):
    root, metrics = runs
    out = root / "cogview"
    cfg, model, tok = load_run(out, "cpu")
    assert cfg.model.vocab_size == tok.vocab_size + 16  # the text vocabulary with [BOI], then the 16 codes
    logged = losses(out)
    assert len(logged) == 8 and logged[-1] < logged[0]
    assert set(metrics) >= {"val_loss", "unseen_loss"} and (out / "samples.png").is_file()
    r = subprocess.run([sys.executable, "scripts/draw.py", str(out), "--prompt", "a small red circle above a big blue box",
                        "--num-samples", "3", "--out", str(tmp_path / "grid.png")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "grid.png").stat().st_size > 0 and "note:" not in r.stdout  # a caption of the grammar
    r = subprocess.run([sys.executable, "scripts/generate.py", str(out), "--prompt", "a red circle"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error: generate: a text_to_image run draws pictures; "
                                                     f"write them with python scripts/draw.py {out}")


CLIP_TINY = ("model.n_layer=1", "model.d_model=32", "model.n_head=2", "model.embed_dim=32", "model.text.n_layer=1",
             "model.text.d_model=32", "model.text.n_head=2", "train.batch_size=8", "train.max_steps=2",
             "train.eval_batches=1", "train.device=cpu", "output.plot=false")


@pytest.fixture(scope="module")
def clip_run(runs):
    """A tiny CLIP run (configs/clip.yaml, 64 train scenes) next to the tiny cogview run: the reranker."""
    root, _ = runs
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(shapes, "N_TRAIN", 64)
        run(load_config("configs/clip.yaml", [*CLIP_TINY, f"output.dir={root / 'clip'}"]), quiet=True)
    return root / "clip"


def test_rerank_prints_the_kept_pictures_best_first_with_their_clip_scores(runs, clip_run, tmp_path, capsys):
    root, _ = runs
    prompt = "a small red circle above a big blue box"
    assert draw.main([str(root / "cogview"), "--prompt", prompt, "--num-samples", "4", "--rerank", str(clip_run),
                      "--keep", "2", "--out", str(tmp_path / "best.png"), "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    ranked = [(float(score), int(i) - 1) for _, score, _, i, _ in (line.split() for line in lines[:-1])]
    assert len(ranked) == 2 and lines[-1] == f"2 pictures -> {tmp_path / 'best.png'}"
    # the same 4 pictures (same seed), scored here: draw.py kept the two best, best first
    _, model, tok, image_tokenizer, layout = load_drawing_run(root / "cogview", "cpu")
    images = layout.generate(model, image_tokenizer, [tok.encode(prompt)] * 4, generator=torch.Generator().manual_seed(0))
    clip_cfg, clip, clip_tok = load_clip_run(clip_run, "cpu")
    scores = clip_similarity(clip, clip_tok, clip_cfg.data.seq_len, images, [parse_scene(im) for im in images], [prompt])[:, 0]
    for score, i in ranked:
        assert abs(score - scores[i].item()) < 1e-3
    assert ranked[0][0] >= ranked[1][0] >= scores.sort(descending=True).values[2].item() - 1e-3
    assert draw.main([str(root / "cogview"), "--prompt", prompt, "--keep", "2"]) == 2
    assert capsys.readouterr().err == "error: --keep: needs --rerank and 1 .. --num-samples (8), got 2\n"


def test_judged_shares_in_closed_form():
    true = torch.tensor([[0, 1, 0], [0, 0, 0], [1, 1, 1]], dtype=torch.bool)  # (C=3 captions, N=3 pictures)
    own = torch.tensor([[0.1, 0.9, 0.2], [0.6, 0.7, 0.4], [0.3, 0.8, 0.9]])  # each picture's score for its caption
    sim = torch.zeros(3, 3, 3)
    for c in range(3):
        sim[c, :, c] = own[c]
        sim[c, :, (c + 1) % 3] = 0.5  # a rival caption: the own one ranks first where it scores above 0.5
    n = judge_cogview.judged(true, sim, torch.tensor([False, True, True]))
    expected = {"seen": {"captions": 1, "true": 1 / 3, "reranked": 1, "any": 1, "r_precision": 1 / 3},
                "unseen": {"captions": 2, "true": 1 / 2, "reranked": 1 / 2, "any": 1 / 2, "r_precision": 2 / 3},
                "all": {"captions": 3, "true": 4 / 9, "reranked": 2 / 3, "any": 2 / 3, "r_precision": 5 / 9}}
    assert n.keys() == expected.keys()
    for group, values in expected.items():
        assert n[group] == pytest.approx(values), group


def test_the_judge_on_a_tiny_run(runs, clip_run, capsys):
    root, _ = runs
    args = [str(root / "cogview"), "--clip", str(clip_run), "--samples", "3", "--device", "cpu"]
    assert judge_cogview.main(args + ["--per-group", "2", "--json"]) == 0
    n = json.loads(capsys.readouterr().out)
    assert (n["captions"], n["samples"], n["r_precision_chance"]) == (4, 3, 1 / 4)
    for numbers in (n["drawn"], n["gallery"]):
        assert [numbers[g]["captions"] for g in ("seen", "unseen", "all")] == [2, 2, 4]
        for d in numbers.values():
            assert 0 <= d["true"] <= d["any"] and d["reranked"] <= d["any"] <= 1 and 0 <= d["r_precision"] <= 1
    # the captions: the gallery's first two naming no UNSEEN pair, then its first two naming one
    gallery = shapes.gallery_split()
    names = [any((p.colour, p.shape) in shapes.UNSEEN for p in c.phrases) for c in gallery.captions]
    picked = [i for i, u in enumerate(names) if not u][:2] + [i for i, u in enumerate(names) if u][:2]
    true = [shapes.is_true_of(gallery.captions[i], parse_scene(gallery.images[i])) for i in picked]
    assert n["gallery"]["all"]["true"] == sum(true) / 4 and n["gallery"]["unseen"]["true"] == sum(true[2:]) / 2
    assert judge_cogview.main(args + ["--per-group", "1000"]) == 2
    assert capsys.readouterr().err.startswith("error: --per-group: the gallery has ")


def test_the_drawing_and_the_clip_run_must_be_of_their_kinds(runs, clip_run):
    root, _ = runs
    with pytest.raises(ConfigError, match=r"clip: needs a text_to_image run \(configs/cogview.yaml\), got data.task image_text$"):
        load_drawing_run(clip_run, "cpu")
    with pytest.raises(ConfigError, match=r"cogview: needs a brivl run on data.source shapes \(configs/clip.yaml\), got gpt on shapes$"):
        load_clip_run(root / "cogview", "cpu")

"""The VQ-VAE image tokenizer (minimodels/models/vqvae.py): the straight-through gradient, the codebook's
nearest-code search, EMA update, restarts and usage metrics against closed forms, the batch-independence of the
update, encode/decode shapes, and a tiny run through the trainer."""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import events
from minimodels.config import load_config
from minimodels.data import shapes
from minimodels.models.vqvae import VQVAE, Codebook, VQVAEConfig, codebook_usage, psnr


def tiny(**kw) -> VQVAE:
    torch.manual_seed(0)
    return VQVAE(VQVAEConfig(**{"channels": 8, "n_res_block": 1, "codebook_size": 16, "code_dim": 4, **kw}))


def images(B=4, seed=0) -> torch.Tensor:
    return torch.rand(B, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_the_encoder_gets_the_decoders_gradient_straight_through():
    model = tiny(beta=0.0)
    x = images()
    z_e = model.encoder(x)
    z_e.retain_grad()
    z_q, ids, _ = model.codebook(z_e)
    z_q.retain_grad()
    F.mse_loss(model.decoder(z_q), x).backward()
    torch.testing.assert_close(z_q, model.codebook.codes[ids].permute(0, 3, 1, 2))  # forward: the nearest codes
    assert z_q.grad.abs().sum() > 0
    torch.testing.assert_close(z_e.grad, z_q.grad, rtol=0, atol=0)  # backward: the identity
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder.parameters())
    assert not list(model.codebook.parameters())  # the codes are buffers: only the EMA moves them


def test_commitment_gradient_is_the_closed_form():
    """d/dz_e of beta * mean ||z_e - sg[e_k]||^2 = 2 beta (z_e - e_k) / (number of elements)."""
    model = tiny()
    z_e = torch.randn(2, 4, 3, 3, requires_grad=True)
    _, ids, commitment = model.codebook(z_e)
    (0.25 * commitment).backward()
    e_k = model.codebook.codes[ids].permute(0, 3, 1, 2)  # (B, D, h, w)
    torch.testing.assert_close(z_e.grad, 2 * 0.25 * (z_e.detach() - e_k) / z_e.numel())


def test_nearest_is_the_brute_force_argmin():
    book = tiny().codebook
    z = torch.randn(50, 4)
    brute = torch.tensor([min(range(16), key=lambda j: float(((zi - book.codes[j]) ** 2).sum())) for zi in z])
    assert torch.equal(book.nearest(z), brute)


@pytest.mark.parametrize("counts,perplexity,dead", [
    ([4, 4, 0, 0], 2.0, 0.5),  # two codes, equally often: perplexity 2, half the codes dead
    ([3, 3, 3, 3], 4.0, 0.0),  # uniform over K: perplexity K
    ([0, 9, 0, 0], 1.0, 0.75),  # one code takes all
    ([1, 3, 0, 0], math.exp(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75))), 0.5),
])
def test_codebook_usage_on_constructed_counts(counts, perplexity, dead):
    p, d = codebook_usage(torch.tensor(counts))
    assert p.item() == pytest.approx(perplexity) and d.item() == pytest.approx(dead)


def test_psnr_is_the_closed_form():
    assert psnr(torch.tensor(0.04)).item() == pytest.approx(10 * math.log10(4 / 0.04))


def test_ema_update_is_the_formula_and_unpicked_codes_stay():
    book = Codebook(VQVAEConfig(codebook_size=3, code_dim=2, decay=0.9, eps=1e-5, restart_below=0.0)).train()
    book.codes.copy_(torch.tensor([[0.0, 0.0], [10.0, 10.0], [-10.0, 5.0]]))
    book.code_sum.copy_(book.codes)  # N_j = 1: m_j = e_j
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [9.0, 11.0]])  # nearest codes 0, 0, 1; code 2 unpicked
    book(z.T.reshape(1, 2, 1, 3))  # (B, D, h, w) with the three latents on a 1 x 3 grid
    book.update()
    N = 0.9 * torch.ones(3) + 0.1 * torch.tensor([2.0, 1.0, 0.0])
    m = 0.9 * torch.tensor([[0.0, 0.0], [10.0, 10.0], [-10.0, 5.0]]) + 0.1 * torch.tensor([[1.0, 1.0], [9.0, 11.0], [0.0, 0.0]])
    smoothed = (N + 1e-5) / (N.sum() + 3e-5) * N.sum()
    torch.testing.assert_close(book.cluster_size, N)
    torch.testing.assert_close(book.codes, m / smoothed[:, None])
    torch.testing.assert_close(book.codes[2], torch.tensor([-10.0, 5.0]), atol=1e-4, rtol=0)  # stays (up to eps)
    assert book.pending is None


def test_a_dead_code_restarts_on_the_worst_fit_latent():
    book = Codebook(VQVAEConfig(codebook_size=3, code_dim=2, decay=0.5, restart_below=0.6)).train()
    book.codes.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0], [50.0, 50.0]]))
    book.code_sum.copy_(book.codes)
    z = torch.tensor([[0.1, 0.0], [1.0, 0.9], [-7.0, 3.0], [0.9, 1.1]])  # code 2 unpicked: N_2 = 0.5 < 0.6
    book(z.T.reshape(1, 2, 1, 4))
    book.update()
    torch.testing.assert_close(book.codes[2], torch.tensor([-7.0, 3.0]))  # the latent farthest from its code
    assert book.cluster_size[2] == 1 and torch.equal(book.code_sum[2], book.codes[2])
    assert torch.all(book.cluster_size[:2] >= 0.6)  # the live codes were left alone


def test_micro_batches_update_the_codebook_like_one_batch_in_any_order():
    """The docstring's promise behind train.grad_accum and torchrun: statistics accumulate until the optimizer step."""
    z = torch.randn(2, 16, 4, 4, 4) * 2  # two micro-batches of 16 latent grids
    books = []
    for parts in ([z[0], z[1]], [z[1], z[0]], [torch.cat([z[0], z[1]])]):
        book = tiny(restart_below=0.995).codebook.train()  # the codes no latent picks (N_j = 0.99) restart
        for part in parts:
            book(part)
        book.update()
        books.append(book)
    restarted = books[0].cluster_size == 1
    assert 0 < restarted.sum() < 16
    for other in books[1:]:
        for name, buf in books[0].named_buffers():
            torch.testing.assert_close(buf, dict(other.named_buffers())[name], rtol=1e-6, atol=1e-6, msg=name)


def test_encode_decode_shapes_and_forward_agree():
    model = tiny().eval()
    x = images(B=3)
    ids = model.encode(x)
    assert ids.shape == (3, 8, 8) and ids.dtype == torch.long and 0 <= ids.min() and ids.max() < 16
    out = model(x)
    assert torch.equal(out.ids, ids)
    decoded = model.decode(ids)
    assert decoded.shape == x.shape
    torch.testing.assert_close(decoded, out.reconstructions)  # in eval mode forward = decode(encode(x))
    assert model.codebook.pending is None  # eval mode leaves the codebook alone
    with pytest.raises(ValueError, match=r"images: expected \(B, 3, 32, 32\) \(model.image_size\)"):
        model(torch.zeros(2, 3, 16, 16))


def test_bad_configs_name_the_key():
    for kw, key in ((dict(downsample=3), "model.downsample"), (dict(image_size=36, downsample=8), "model.image_size"),
                    (dict(decay=1.0), "model.decay"), (dict(restart_below=-1.0), "model.restart_below")):
        with pytest.raises(ValueError, match=key):
            VQVAEConfig(**kw).validate()


def test_a_tiny_run_lowers_the_loss_and_draws_reconstructions(tmp_path, monkeypatch):
    from minimodels.train.run import run

    monkeypatch.setattr(shapes, "N_TRAIN", 128)
    cfg = load_config("configs/vqvae.yaml", [
        "model.channels=16", "model.n_res_block=1", "model.codebook_size=32", "model.code_dim=8", "train.batch_size=16",
        "train.max_steps=40", "train.warmup_steps=5", "train.eval_interval=40", "train.eval_batches=2",
        "train.log_interval=5", "train.device=cpu", f"output.dir={tmp_path}"])
    metrics = run(cfg, quiet=True)
    logged = [e["loss"] for e in events(tmp_path) if "loss" in e]
    assert len(logged) == 8 and logged[-1] < min(logged[:4])  # below every loss of the first half
    assert metrics["val_psnr"] == pytest.approx(10 * math.log10(4 / metrics["val_mse"]), rel=1e-6)
    assert 1 <= metrics["val_perplexity"] <= 32 and 0 <= metrics["val_dead_codes"] < 1 and metrics["unseen_mse"] > 0
    assert (tmp_path / "reconstructions.png").is_file() and (tmp_path / "loss.png").is_file()


def test_reconstruction_pictures_are_the_gallery_above_its_reconstructions(monkeypatch):
    from minimodels.data.reconstruction import N_PICTURES, ImageReconstructionTask

    monkeypatch.setattr(shapes, "N_TRAIN", 64)
    task = ImageReconstructionTask(None, {}, None)
    model = tiny().train()
    (label_a, originals), (label_b, decoded) = task.pictures(model)["reconstructions"]
    assert (label_a, label_b) == ("original", "reconstruction") and model.training  # mode restored
    assert torch.equal(originals, task.val[:N_PICTURES]) and decoded.dtype == torch.uint8
    model.eval()
    expected = shapes.to_uint8(model(shapes.to_unit_range(originals)).reconstructions)
    assert torch.equal(decoded, expected)


def test_evaluate_of_a_perfect_reconstructor(monkeypatch):
    """A model that hands back its input and picks codes 0 and 1 alike: val_mse 0, the parser's own rate on the
    originals as val_parsed, perplexity 2 with 2 of 4 codes dead."""
    from types import SimpleNamespace

    from minimodels.data.reconstruction import ImageReconstructionTask
    from minimodels.data.scene_parser import parse_scene, same_scene
    from minimodels.train.trainer import val_batches

    monkeypatch.setattr(shapes, "N_TRAIN", 64)
    task = ImageReconstructionTask(None, {}, None)

    class Identity:
        config = SimpleNamespace(codebook_size=4)
        psnr, codebook_usage = staticmethod(psnr), staticmethod(codebook_usage)  # as VQVAE

        def __call__(self, images):
            ids = torch.arange(len(images) * 4).view(-1, 2, 2) % 2  # (B, 2, 2): codes 0 and 1, equally often
            return SimpleNamespace(loss=torch.tensor(0.0), reconstructions=images, ids=ids)

    m = task.evaluate(Identity(), val_batches(task, 50, max_batches=4))  # the first 200 gallery scenes
    originals = [same_scene(parse_scene(image), scene) for image, scene in zip(task.val[:200], task.val_scenes)]
    assert m["val_mse"] == 0 and m["unseen_mse"] == 0 and math.isinf(m["val_psnr"])
    assert m["val_parsed"] == pytest.approx(sum(originals) / 200) and m["val_parsed"] >= 0.97
    assert m["val_perplexity"] == pytest.approx(2.0) and m["val_dead_codes"] == 0.5

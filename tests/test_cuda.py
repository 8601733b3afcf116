"""On a CUDA GPU: bf16 and fp16 training steps follow fp32 on the CPU, DDP over nccl on 2 GPUs trains like one
GPU with the whole batch, and GPT's attention runs SDPA's flash kernel. Every test here is marked `cuda` and is
skipped on a machine without a GPU (tests/conftest.py); train.compile=true on a GPU is in test_train.py
(`pytest -m cuda` runs them all)."""

import pytest
import torch

from conftest import assert_same, train, weights
from minimodels.train import Trainer
from test_distributed import config  # noqa: F401  (the fixture: a tiny GPT on a character corpus)
from test_train import RandomLMTask, tiny_gpt, train_cfg

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_mixed_precision_training_on_the_gpu_follows_fp32_on_the_cpu(tmp_path, dtype):
    """The first loss (same weights, same batch) is fp32's up to the dtype's precision; the weights stay fp32
    (autocast), fp16 runs with a loss scaler, and 10 steps lower the loss with finite weights."""
    task = RandomLMTask()
    cpu = Trainer(tiny_gpt(), task, train_cfg(), tmp_path / "cpu", quiet=True)
    gpu = Trainer(tiny_gpt(), task, train_cfg(device="cuda", dtype=dtype, max_steps=10), tmp_path / dtype, quiet=True)
    assert gpu.scaler.is_enabled() == (dtype == "fp16")
    losses = [gpu.train_step()["loss"] for _ in range(10)]
    assert losses[0] == pytest.approx(cpu.train_step()["loss"], rel=2e-2)
    assert losses[-1] < losses[0]
    for name, p in gpu.model.named_parameters():
        assert p.is_cuda and p.dtype == torch.float32 and bool(p.isfinite().all()), name


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_ddp_over_nccl_on_two_gpus_trains_like_one_gpu_with_the_whole_batch(config, tmp_path):  # noqa: F811
    gpu = ["train.device=cuda", "train.dtype=fp32"]
    train(config, tmp_path / "ddp", *gpu, "train.batch_size=2", "train.distributed.backend=nccl", nproc=2)
    train(config, tmp_path / "one", *gpu, "train.batch_size=4")
    assert_same(weights(tmp_path / "ddp"), weights(tmp_path / "one"), atol=1e-5)


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 0),
                    reason="SDPA's flash kernel needs compute capability 8.0 (Ampere) or newer")
def test_gpt_attention_runs_the_flash_kernel_of_sdpa_forward_and_backward():
    """attn_impl auto on a GPU is SDPA, and a training forward (causal, no padding mask) can take the flash
    kernel: with every other SDPA kernel switched off the step runs, and its logits are the manual attention's."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    ids = torch.randint(0, 50, (4, 16), generator=torch.Generator().manual_seed(0)).cuda()
    logits = {}
    for impl in ("auto", "manual"):
        model = tiny_gpt(attn_impl=impl).cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16), sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            out = model(ids, labels=ids)  # with flash unavailable for these inputs, SDPA raises "No available kernel"
            out.loss.backward()
        logits[impl] = out.logits.float()
    torch.testing.assert_close(logits["auto"], logits["manual"], rtol=2e-2, atol=2e-2)


def test_batches_reach_the_gpu_from_pinned_memory_without_changing_a_value():
    from minimodels.train.device import to_device

    batch = {"input_ids": torch.arange(12).view(3, 4), "note": "kept"}
    out = to_device(batch, torch.device("cuda"))
    torch.cuda.synchronize()
    assert out["input_ids"].is_cuda and torch.equal(out["input_ids"].cpu(), batch["input_ids"]) and out["note"] == "kept"
    assert not batch["input_ids"].is_pinned()  # pinning copies; the caller's tensor stays as it was

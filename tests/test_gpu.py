"""CUDA-only checks (``make test-gpu``): the flex-attention training path against the dense
oracle (outputs and gradients), bf16 training, and a DeepSpeed ZeRO-2 fit."""

import pytest
import torch

from fluid.lanes import FluidSchedule, expand_lanes
from fluid.lanes.attention import block_mask, dense_float_mask
from tests.conftest import tiny_model
from tests.test_lanes import MASK, NOISE, PAD_ID, make_batch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _lane_batch(device):
    ids, labels, am = make_batch(lengths=(200, 150, 90), prompt=(20, 10, 30), seed=0)
    lb = expand_lanes(ids, labels, am, FluidSchedule(horizon=8), mask_token_id=MASK, noise_token_ids=NOISE,
                      pad_token_id=PAD_ID, generator=torch.Generator().manual_seed(0), pad_to_multiple=128)
    return lb.to(device)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_flex_matches_dense_outputs_and_gradients(arch):
    from fluid.modules.hybrid import combine, lane_losses

    lb = _lane_batch("cuda")
    results = {}
    for backend in ("dense", "flex"):
        model = tiny_model(arch, vocab_size=128).cuda().train()
        if backend == "flex":
            model.config._attn_implementation = "flex_attention"
            mask = block_mask(lb)
        else:
            mask = dense_float_mask(lb, torch.float32)
        logits = model(input_ids=lb.input_ids, attention_mask=mask, position_ids=lb.position_ids).logits
        combine(lane_losses(logits, lb)).backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        results[backend] = (logits.detach(), grads)
    valid = lb.valid
    torch.testing.assert_close(results["flex"][0][valid], results["dense"][0][valid], atol=2e-4, rtol=2e-3)
    for name, g in results["dense"][1].items():
        torch.testing.assert_close(results["flex"][1][name], g, atol=2e-4, rtol=5e-3, msg=name)


def test_bf16_lane_step_is_finite():
    from fluid.modules.hybrid import combine, lane_losses

    lb = _lane_batch("cuda")
    model = tiny_model("llama", vocab_size=128).cuda().to(torch.bfloat16)
    model.config._attn_implementation = "flex_attention"
    logits = model(input_ids=lb.input_ids, attention_mask=block_mask(lb), position_ids=lb.position_ids).logits
    loss = combine(lane_losses(logits, lb))
    loss.backward()
    assert torch.isfinite(loss)


def test_deepspeed_zero2_stage1_fit(tmp_path, cache_dir, tiny_checkpoint):
    from fluid.train import train
    from tests.conftest import compose_cfg

    cfg = compose_cfg(["stage=1", "strategy=deepspeed_zero2", "trainer=gpu", "trainer.devices=1", "logger=csv",
                       "trainer.max_steps=3", "trainer.val_check_interval=3", "data.source.n_train=64",
                       "data.source.n_val=8", "data.source.n_test=8", "test=false", "publish=false",
                       f"backbone.path={tiny_checkpoint}"], tmp_path, cache_dir)
    metrics = train(cfg)
    assert metrics["status"] == "completed" and metrics["train/steps"] == 3

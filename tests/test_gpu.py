"""CUDA-only checks (``make test-gpu``): the flex-attention training path against the dense
oracle (outputs and gradients), bf16 training, a DeepSpeed ZeRO-2 fit, decoding on CUDA
(lossless in fp32, running in bf16, compiled) and ``load_fluid`` onto the device in bf16.
Every test skips without CUDA; on CPU the module still imports (``pytest -m gpu`` reports skips)."""

import pytest
import torch

from fluid.lanes import FluidSchedule, expand_lanes
from fluid.lanes.attention import block_mask, dense_float_mask
from tests.conftest import (
    DECODE_VOCAB,
    MASK_ID,
    NOISE,
    PAD_ID,
    ar_reference,
    compose_cfg,
    constant_model,
    fluid_decoder,
    make_batch,
    random_prompts,
    tiny_model,
)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _lane_batch(device):
    ids, labels, am = make_batch(lengths=(200, 150, 90), prompt=(20, 10, 30), seed=0)
    lb = expand_lanes(ids, labels, am, FluidSchedule(horizon=8), mask_token_id=MASK_ID, noise_token_ids=NOISE,
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
    pytest.importorskip("deepspeed", reason="strategy=deepspeed_zero2 needs DeepSpeed (pip install deepspeed)")
    from fluid.train import train

    cfg = compose_cfg(["stage=1", "strategy=deepspeed_zero2", "trainer=gpu", "trainer.devices=1", "logger=csv",
                       "trainer.max_steps=3", "trainer.val_check_interval=3", "data.source.n_train=64",
                       "data.source.n_val=8", "data.source.n_test=8", "test=false", "publish=false",
                       f"backbone.path={tiny_checkpoint}"], tmp_path, cache_dir)
    metrics = train(cfg)
    assert metrics["status"] == "completed" and metrics["train/steps"] == 3


@pytest.mark.parametrize("batch_size", [1, 4])
def test_fluid_decoding_on_cuda_fp32_is_lossless(batch_size):
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 verification: exact AR argmax
    model = tiny_model("qwen2", vocab_size=DECODE_VOCAB, seed=1).cuda()
    ps = random_prompts(6, DECODE_VOCAB, seed=2)
    ref = ar_reference(model, ps, 24)
    for horizon in ("head", "fixed"):
        out = fluid_decoder(model, horizon=horizon, fixed_k=5, k_min=2, k_max=8, batch_size=batch_size,
                      max_new_tokens=24, confidence=0.3).generate(ps)  # the head goes to the model's device
        assert out["tokens"] == ref, horizon
        assert all(sum(r.accepted) == len(r.tokens) == 24 for r in out["rows"])


def test_fluid_decoding_runs_in_bf16_and_compiled_on_cuda():
    model = constant_model().cuda().to(torch.bfloat16)
    ps = random_prompts(4, DECODE_VOCAB, seed=4)
    dec = fluid_decoder(model, horizon="fixed", fixed_k=8, k_min=1, k_max=8, max_new_tokens=32, batch_size=4,
                  confidence=0.3)
    out = dec.generate(ps)
    for row in out["rows"]:
        assert len(row.tokens) == 32 and sum(row.accepted) == 32
    assert out["tpf"] > 2  # perfect drafts: whole blocks accepted in bf16 too
    fp32 = constant_model().cuda()
    ref = ar_reference(fp32, ps, 16)
    compiled = fluid_decoder(fp32, horizon="fixed", fixed_k=8, k_min=1, k_max=8, max_new_tokens=16, confidence=0.3,
                       compile=True)
    for bs in (1, 4):
        assert compiled.generate(ps, batch_size=bs)["tokens"] == ref


def test_load_fluid_places_backbone_and_head_on_cuda_in_bf16(tiny_checkpoint, tmp_path):
    """``load_fluid(path, device, dtype)`` puts the stage-1 backbone and the stage-2 head on the
    device in the dtype asked for, and the decoder runs on them there."""
    from fluid.checkpoint import CheckpointMeta, load_fluid
    from fluid.decoding import DecodeConfig, FluidDecoder
    from fluid.khead import KHead

    torch.manual_seed(0)
    KHead(64, 6).save(tmp_path / "stage2")  # tiny_model's hidden size
    CheckpointMeta(stage=2, stage1_checkpoint=str(tiny_checkpoint), head_file="khead.safetensors",
                   horizon=6).write(tmp_path / "stage2")
    fm = load_fluid(tmp_path / "stage2", device="cuda", dtype=torch.bfloat16)
    for module in (fm.model, fm.head):
        assert all(p.is_cuda and p.dtype == torch.bfloat16 for p in module.parameters())
    dec = FluidDecoder(fm.model, fm.tokenizer, head=fm.head, mask_token_id=fm.mask_token_id,
                       config=DecodeConfig(max_new_tokens=12, k_min=1, k_max=6))
    out = dec.generate(["1 + 2 =", "3 * 4 ="], batch_size=2)
    assert [sum(r.accepted) for r in out["rows"]] == [len(t) for t in out["tokens"]]
    assert all(1 <= len(t) <= 12 and r.horizons for t, r in zip(out["tokens"], out["rows"]))

"""Stage 2 module: frozen backbone (bit-identical), only the head trains and is saved."""

import json
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
from transformers import AutoTokenizer

from fluid.backbones.spec import BackboneSpec
from fluid.checkpoint import CheckpointMeta, load_fluid
from fluid.data import ArithSource, SFTDataModule
from fluid.khead import KHead, k_star, kl_to_soft_labels, soft_labels
from fluid.modules.khead import KHeadModule
from tests.conftest import hist_mean


def stage1_like(tiny_checkpoint, tmp_path):
    ckpt = tmp_path / "stage1"
    shutil.copytree(tiny_checkpoint, ckpt)
    tok = AutoTokenizer.from_pretrained(ckpt)
    (ckpt / "fluid.json").write_text(json.dumps({"stage": 1, "horizon": 6, "mask_token_id": tok.mask_token_id}))
    return ckpt, tok


def test_backbone_bit_identical_and_only_head_saved(tiny_checkpoint, tmp_path):
    ckpt, tok = stage1_like(tiny_checkpoint, tmp_path)
    spec = BackboneSpec(name="t", path=str(ckpt), dtype="float32")
    module = KHeadModule(spec, tok, tau={"value": 6.0, "sigma": 1.5}, optim={"lr": 1e-2, "warmup_ratio": 0.0},
                         attention="dense")
    assert module.horizon == 6
    dm = SFTDataModule(ArithSource(n_train=32, n_val=8, n_test=4), tok, batch_size=8, eval_batch_size=8)
    trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, val_check_interval=2, num_sanity_val_steps=0,
                        enable_model_summary=False)
    module.configure_model()
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    head0 = {k: v.clone() for k, v in module.head.state_dict().items()}
    trainer.fit(module, datamodule=dm)
    for k, v in module.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert any(not torch.equal(v, head0[k]) for k, v in module.head.state_dict().items())
    opt = trainer.optimizers[0]
    n_opt = sum(p.numel() for grp in opt.param_groups for p in grp["params"])
    assert n_opt == sum(p.numel() for p in module.head.parameters())
    assert all(not p.requires_grad for p in module.model.parameters())
    for key in ("val/head_acc", "val/head_acc_within1", "val/mean_target_k", "val/mean_pred_k"):
        assert key in trainer.callback_metrics
    # the histograms count the last validation's horizons, the val/mean_* metrics average them
    hist = module.histograms
    assert len(hist["target_k"]) == len(hist["pred_k"]) == 6
    assert sum(hist["target_k"]) == sum(hist["pred_k"]) > 0
    assert float(trainer.callback_metrics["val/mean_target_k"]) == pytest.approx(hist_mean(hist["target_k"]), rel=1e-5)
    assert float(trainer.callback_metrics["val/mean_pred_k"]) == pytest.approx(hist_mean(hist["pred_k"]), rel=1e-5)
    out = module.export_hf(tmp_path / "stage2")
    # only the head and fluid.json are written; the model and tokenizer files are links to the
    # stage-1 directory (so that the directory loads as a model), custom_generate/ the generate entry
    own = sorted(p.name for p in out.iterdir() if p.is_file() and not p.is_symlink())
    assert own == ["fluid.json", "khead.safetensors"]
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["custom_generate"]
    stage1 = Path(CheckpointMeta.read(out).stage1_checkpoint).resolve()
    links = [p for p in out.iterdir() if p.is_symlink()]
    assert links and all(p.resolve().parent == stage1 for p in links)
    assert any(p.name.endswith(".safetensors") for p in links)
    fm = load_fluid(out)
    head, tok2, meta = fm.head, fm.tokenizer, fm.meta
    assert meta == CheckpointMeta.read(out) and meta.stage == 2
    assert meta.stage1_checkpoint == str(ckpt.resolve()) and head.horizon == 6
    assert meta.histograms == hist and meta.tau == 6.0 and meta.sigma == 1.5
    torch.testing.assert_close(head.net[0].weight, module.head.net[0].weight)
    assert len(tok2) == len(tok)


def test_head_learns_a_known_horizon():
    """Two kinds of context: easy ones (slot losses stay low for 9 slots) and hard ones (only
    the first slot is below tau). The head must learn K* = 9 vs K* = 1 from the features."""
    g = torch.Generator().manual_seed(0)
    n, h, kmax, tau = 512, 32, 12, 2.0
    kind = torch.rand(n, generator=g) < 0.5
    feats = torch.randn(n, h, generator=g) + 2.0 * kind[:, None].float()
    losses = torch.full((n, kmax), 20.0)
    losses[kind, :9] = 0.5
    losses[~kind, 0] = 1.0
    kstar = k_star(losses, torch.ones_like(losses, dtype=torch.bool), tau)
    assert set(kstar.tolist()) == {1, 9}
    q = soft_labels(kstar, kmax, 1.5)
    torch.manual_seed(0)
    head = KHead(h, kmax)
    opt = torch.optim.AdamW(head.parameters(), lr=3e-3)
    for _ in range(300):
        loss = kl_to_soft_labels(head(feats), q)
        opt.zero_grad()
        loss.backward()
        opt.step()
    acc = (head.predict_k(feats) == kstar).float().mean().item()
    assert acc > 0.95, acc

"""fluid.checkpoint: one writer and one reader of fluid.json, one loader for every kind of directory."""

import json
import shutil

import pytest
import torch

from fluid.checkpoint import FLUID_JSON, CheckpointMeta, backbone_dir, load_fluid, mask_token_id
from fluid.khead import KHead
from fluid.utils.errors import FluidConfigError


def test_meta_round_trip_keeps_unknown_keys(tmp_path):
    meta = CheckpointMeta(stage=1, source_backbone="tiny", mask_token="<|mask|>", mask_token_id=7, horizon=16,
                          masking={"anchor_prob": 0.5}, data="arith", seed=3, extra={"written_by": "a newer version"})
    meta.write(tmp_path)
    on_disk = json.loads((tmp_path / FLUID_JSON).read_text())
    assert on_disk["written_by"] == "a newer version" and "tau" not in on_disk  # unset fields are not written
    assert CheckpointMeta.read(tmp_path) == meta


def test_directory_without_fluid_json_reads_as_plain(tmp_path):
    assert CheckpointMeta.read(tmp_path) == CheckpointMeta()
    (tmp_path / FLUID_JSON).write_text("{not json")
    with pytest.raises(FluidConfigError, match="not valid JSON"):
        CheckpointMeta.read(tmp_path)


def test_mask_id_recorded_by_training_wins_over_the_tokenizer(arith_tokenizer):
    assert mask_token_id(CheckpointMeta(mask_token_id=5), arith_tokenizer) == 5
    assert mask_token_id(CheckpointMeta(), arith_tokenizer) == arith_tokenizer.mask_token_id


def test_load_plain_stage1_and_stage2(tiny_checkpoint, tmp_path):
    plain = load_fluid(tiny_checkpoint)
    assert plain.head is None and plain.meta.stage is None and not plain.model.training
    assert plain.mask_token_id == plain.tokenizer.mask_token_id

    stage1 = tmp_path / "stage1"
    shutil.copytree(tiny_checkpoint, stage1)
    CheckpointMeta(stage=1, mask_token_id=9, horizon=6).write(stage1)
    s1 = load_fluid(stage1)
    assert s1.head is None and s1.meta.horizon == 6 and s1.mask_token_id == 9

    stage2 = tmp_path / "stage2"
    torch.manual_seed(0)
    head = KHead(s1.model.config.hidden_size, 6)
    head.save(stage2)
    CheckpointMeta(stage=2, stage1_checkpoint=str(stage1), head_file="khead.safetensors", horizon=6,
                   mask_token_id=9, tau=2.8, sigma=1.5).write(stage2)
    assert backbone_dir(stage2)[0] == stage1
    s2 = load_fluid(stage2, dtype=torch.float32)
    assert s2.meta.tau == 2.8 and s2.mask_token_id == 9
    torch.testing.assert_close(s2.head.net[0].weight, head.net[0].weight)
    for (name, a), b in zip(s2.model.state_dict().items(), s1.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_missing_directories_are_one_line_errors(tiny_checkpoint, tmp_path):
    with pytest.raises(FluidConfigError, match="does not exist") as e:
        load_fluid(tmp_path / "nope")
    assert "\n" not in str(e.value)
    stage2 = tmp_path / "stage2"
    CheckpointMeta(stage=2, stage1_checkpoint=str(tmp_path / "gone"), head_file="khead.safetensors").write(stage2)
    with pytest.raises(FluidConfigError, match="stage-1 directory") as e:
        load_fluid(stage2)
    assert "\n" not in str(e.value)

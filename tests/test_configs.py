"""Every option of every config group composes, resolves and takes effect; every option that can be
built on CPU is built (``instantiate`` / ``fluid.utils.build.build``) and checked against its config."""

import re
from pathlib import Path

import pytest
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from fluid.backbones.spec import BackboneSpec
from fluid.config import CONF_DIR, check_group_overrides, experiment_choices, group_options, subdir
from fluid.utils.errors import FluidConfigError
from tests.conftest import compose_cfg
from tests.test_sft import write_gsm8k, write_jsonl

GROUPS = ["stage", "backbone", "masking", "tau", "data", "trainer", "strategy", "logger", "callbacks",
          "experiment", "debug", "paths"]
CASES = [(g, o) for g in GROUPS for o in group_options(g)]
# small data so that building and `setup()` stay cheap
SMALL_ARITH = ["data.source.n_train=16", "data.source.n_val=4", "data.source.n_test=4"]


def _extra(group: str, option: str, tmp_path: Path) -> list[str]:
    """Overrides an option needs to be built here: its data files, the stage a tau is for, and
    for stage 2 the horizon that a stage-1 checkpoint's fluid.json would give."""
    extra = []
    if (group, option) == ("data", "jsonl"):
        extra += [f"data.source.train_path={write_jsonl(tmp_path / 'train.jsonl', 12)}"]
    if (group, option) == ("data", "gsm8k"):
        extra += [f"data.source.data_dir={write_gsm8k(tmp_path / 'gsm8k')}", "data.source.n_val=2"]
    if (group, option) == ("data", "arith"):
        extra += SMALL_ARITH
    stage = None
    if group == "stage":
        stage = option
    if group == "experiment":  # a recipe chooses its stage itself (defaults: override /stage)
        stage = experiment_choices(option).get("stage")
    if group == "tau":
        stage = "2"
        extra += ["stage=2"]
    if stage == "2":
        extra += ["stage.module.horizon=4"]
    return extra


def _leaves(node, prefix=""):
    """(dotted key, value) of every plain leaf of a raw YAML node (interpolations skipped)."""
    if isinstance(node, DictConfig):
        for k, v in node.items_ex(resolve=False):
            if prefix == "" and k == "defaults":
                continue
            yield from _leaves(v, f"{prefix}{k}.")
    elif isinstance(node, ListConfig):
        if "${" not in str(OmegaConf.to_container(node)):
            yield prefix[:-1], OmegaConf.to_container(node)
    elif not (isinstance(node, str) and "${" in node):
        yield prefix[:-1], node


def _option_values(group: str, option: str) -> list[tuple[str, object]]:
    """The plain values an option file sets, with their full keys in the composed config."""
    path = CONF_DIR / group / f"{option}.yaml"
    text = path.read_text()
    package = "" if "# @package _global_" in text.splitlines()[0] else f"{group}."
    return [(package + k, v) for k, v in _leaves(OmegaConf.load(path))]


def _build_stage(cfg, tokenizer):
    """The stage's LightningModule as ``fluid.train`` builds it (no weights are loaded here)."""
    from fluid.utils.build import build

    spec = BackboneSpec.from_config(cfg.backbone)
    consumed = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in cfg.stage.get("consumes", [])}
    return build(cfg.stage.module, backbone=spec, tokenizer=tokenizer, **consumed)


def test_every_required_group_has_options():
    for g in GROUPS:
        assert group_options(g), f"config group {g} is empty"
    assert {"0", "1", "2"} <= set(group_options("stage"))
    assert {"tiny", "smollm2_135m", "qwen2_5_0_5b", "qwen2_5_7b", "llama3_8b", "pangu7b"} <= set(
        group_options("backbone"))


@pytest.mark.parametrize("group,option", CASES, ids=[f"{g}={o}" for g, o in CASES])
def test_option_composes_and_builds(group, option, tmp_path, cache_dir, arith_tokenizer):
    extra = _extra(group, option, tmp_path)
    cfg = compose_cfg([f"{group}={option}", *extra], tmp_path, cache_dir=cache_dir)
    # the option was chosen, and every plain value of its file is in the composed config
    assert HydraConfig.get().runtime.choices[group] == option
    overridden = {ov.split("=", 1)[0] for ov in extra}
    for key, value in _option_values(group, option):
        if key not in overridden:
            assert OmegaConf.select(cfg, key) == value, f"{group}={option}: {key}"
    # every value resolves (no dangling interpolations)
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    if group != "debug":
        assert cfg.trainer.max_steps == cfg.stage.max_steps
    # the backbone config describes a model only: anything else is refused by BackboneSpec
    spec = BackboneSpec.from_config(cfg.backbone)
    assert spec.name == cfg.backbone.name

    if group == "backbone":
        assert spec.name == option and spec.mask_token
        assert spec.trust_remote_code == (option == "pangu7b")
        assert spec.is_embedded == (option == "tiny")
        if spec.is_embedded:  # stage 0 builds it from scratch: cheap enough to do here
            tok = spec.load_tokenizer(from_scratch=True)
            model = spec.build_model(from_scratch=True, vocab_size=len(tok))
            assert model.config.hidden_size == cfg.backbone.scratch.hidden_size
            assert model.config.num_hidden_layers == cfg.backbone.scratch.num_hidden_layers
            assert model.get_input_embeddings().weight.shape[0] == len(tok) <= cfg.backbone.tokenizer.vocab_size
    if group in ("stage", "experiment", "tau"):
        module = _build_stage(cfg, arith_tokenizer)
        assert type(module) is get_class(cfg.stage.module._target_)
        assert module.stage_id == cfg.stage.id
        assert module.optim_cfg.lr == cfg.stage.module.optim.lr
        if cfg.stage.id == 1:
            assert module.lora.enabled == cfg.stage.module.lora.enabled
            assert module.w_ar == cfg.stage.module.loss.ar_weight
            assert module.schedule.horizon == cfg.masking.horizon
        if cfg.stage.id == 2:
            assert module.tau == cfg.tau.value and module.sigma == cfg.tau.sigma
    if group == "masking":
        sched = instantiate(cfg.masking)
        assert type(sched) is get_class(cfg.masking._target_)
        assert (sched.anchor_prob, sched.horizon, sched.noise_prob) == (
            cfg.masking.anchor_prob, cfg.masking.horizon, cfg.masking.noise_prob)
        k = sched.lengths(500, torch.Generator().manual_seed(0), "cpu")
        assert int(k.min()) >= 1 and int(k.max()) == cfg.masking.horizon
        r = sched.restore_ratio(500, torch.Generator().manual_seed(0), "cpu")
        assert float(r.min()) >= 0.0 and float(r.max()) <= 1.0
    if group == "data":
        dm = instantiate(cfg.data, tokenizer=arith_tokenizer, _recursive_=True)
        assert type(dm) is get_class(cfg.data._target_) and dm.name == option
        assert (dm.batch_size, dm.eval_batch_size, dm.max_length) == (
            cfg.data.batch_size, cfg.data.eval_batch_size, cfg.data.max_length)
        dm.setup()
        assert len(dm.train_set) > 0 and len(dm.val_set) > 0 and len(dm.test_set) > 0
        batch = next(iter(dm.train_dataloader()))
        assert batch["input_ids"].shape[0] == min(cfg.data.batch_size, len(dm.train_set))
        assert (batch["labels"] != -100).any()  # responses are supervised
    if group == "trainer":
        trainer = instantiate(cfg.trainer, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
        assert type(trainer) is get_class(cfg.trainer._target_)
        assert trainer.max_steps == cfg.trainer.max_steps == cfg.stage.max_steps
        assert trainer.gradient_clip_val == cfg.trainer.gradient_clip_val
    if group == "strategy":
        if "_target_" in cfg.strategy:
            strategy = instantiate(cfg.strategy)  # DeepSpeed constructs on CPU; it only refuses at fit time
            assert type(strategy) is get_class(cfg.strategy._target_)
            if "stage" in cfg.strategy:
                assert strategy.config["zero_optimization"]["stage"] == cfg.strategy.stage
        else:
            assert cfg.strategy.name == "auto"
    if group in ("logger", "callbacks"):
        for name, node in cfg[group].items():
            obj = instantiate(node)
            assert type(obj) is get_class(node._target_), name
            if group == "logger":
                assert obj.save_dir == node.save_dir
            elif "dirpath" in node:
                assert obj.dirpath == node.dirpath
    if group == "paths":
        assert cfg.paths.output_dir == str(tmp_path)


def _recipe_values(option: str) -> dict:
    """The dotted keys and values an experiment file sets (its group choices left out)."""
    node = OmegaConf.load(CONF_DIR / "experiment" / f"{option}.yaml")
    flat = {}

    def walk(n, prefix):
        for k, v in n.items():
            if prefix == "" and k == "defaults":
                continue
            if isinstance(v, DictConfig):
                walk(v, f"{prefix}{k}.")
            else:
                flat[f"{prefix}{k}"] = OmegaConf.to_container(v) if isinstance(v, ListConfig) else v
        return flat

    return walk(node, "")


def _applies(cfg: DictConfig, values: dict) -> bool:
    return all(OmegaConf.select(cfg, k) == v for k, v in values.items())


def test_a_recipe_applies_only_when_named():
    """No run takes a recipe it did not name: train.yaml chooses none by default and no config
    chooses a group through an interpolation (a file added to conf/ would then change runs).
    ``experiment=NAME`` applies every value of its file and the stage and backbone it chooses."""
    out = Path("/tmp")
    for path in sorted(CONF_DIR.rglob("*.yaml")):
        for entry in OmegaConf.load(path).get("defaults") or [] if path.parent.name != "hydra" else []:
            assert "${" not in str(entry), f"{path.relative_to(CONF_DIR)}: a choice by interpolation: {entry}"
    for n in (0, 1, 2):
        plain = compose_cfg([f"stage={n}"], out)
        assert HydraConfig.get().runtime.choices.experiment is None
        stage_file = OmegaConf.load(CONF_DIR / "stage" / f"{n}.yaml")
        assert plain.stage.max_steps == stage_file.max_steps == plain.trainer.max_steps
        recipe = _recipe_values(f"tiny_stage{n}")
        cfg = compose_cfg([f"experiment=tiny_stage{n}"], out)
        assert recipe and _applies(cfg, recipe) and not _applies(plain, recipe), n
        assert (cfg.stage.id, cfg.backbone.name, cfg.trainer.max_steps) == (n, "tiny", cfg.stage.max_steps)
    for option in group_options("experiment"):  # every recipe names its stage and backbone
        made = experiment_choices(option)
        cfg = compose_cfg([f"experiment={option}"], out)
        assert _applies(cfg, _recipe_values(option)), option
        assert (str(cfg.stage.id), cfg.backbone.name) == (made["stage"], made["backbone"]), option
    s1 = compose_cfg(["experiment=smollm2_gsm8k_stage1", "data.responses=self"], out)
    assert (s1.stage.id, s1.backbone.name, s1.data.name) == (1, "smollm2_135m", "gsm8k")  # its group choices
    assert s1.data.self_responses.model == s1.backbone.path  # stage 1 learns the backbone's responses
    s2 = compose_cfg(["experiment=smollm2_gsm8k_stage2", "stage.init_checkpoint=/runs/s1/checkpoint"], out)
    assert s2.stage.id == 2 and s2.data.self_responses.model == "/runs/s1/checkpoint"  # stage 2: the stage-1 model's


def test_stages_read_no_backbone_settings():
    """How a stage trains is the stage's (or an experiment's) business: stage configs name the
    backbone only for artifact links, and backbone configs hold only what describes the model."""
    for path in sorted((CONF_DIR / "stage").glob("*.yaml")):
        refs = set(re.findall(r"\$\{[^}]*backbone\.(\w+)", path.read_text()))
        assert refs <= {"name"}, f"{path.name} reads backbone.{refs - {'name'}}"
    known = set(BackboneSpec.__dataclass_fields__)
    for path in sorted((CONF_DIR / "backbone").glob("*.yaml")):
        assert set(OmegaConf.load(path)) <= known, path.name


def test_experiments_say_how_to_run_them():
    for option in group_options("experiment"):
        lines = (CONF_DIR / "experiment" / f"{option}.yaml").read_text().splitlines()
        assert lines[0] == "# @package _global_", option
        assert any(ln.startswith("# python -m fluid.train ") for ln in lines[1:4]), option


def test_unknown_backbone_key_is_one_line(tmp_path):
    cfg = compose_cfg(["+backbone.stage1_lr=0.1"], tmp_path)
    with pytest.raises(FluidConfigError) as e:
        BackboneSpec.from_config(cfg.backbone)
    assert str(e.value).startswith("backbone.stage1_lr:") and "\n" not in str(e.value)


def test_data_dir_comes_from_FLUID_DATA_only(tmp_path, monkeypatch):
    """conf/ names no path outside the repository: without FLUID_DATA there is no local data dir."""
    monkeypatch.delenv("FLUID_DATA", raising=False)
    cfg = compose_cfg(["data=gsm8k"], tmp_path)
    assert cfg.paths.data_dir is None and cfg.data.source.data_dir is None
    assert cfg.data.source.hub_id == "openai/gsm8k" and cfg.data.source.hub_config == "main"
    monkeypatch.setenv("FLUID_DATA", str(tmp_path))
    assert compose_cfg(["data=gsm8k"], tmp_path).data.source.data_dir == f"{tmp_path}/gsm8k"
    assert subdir("", "gsm8k") is None and subdir(None, "gsm8k") is None
    for path in CONF_DIR.rglob("*.yaml"):
        assert "../" not in path.read_text(), f"{path} names a path outside the repository"


def test_pangu_mask_token_is_reserved_token():
    cfg = compose_cfg(["backbone=pangu7b"], Path("/tmp"))
    assert cfg.backbone.mask_token == "[unused32]"


def test_unknown_group_option_is_one_line():
    msg = check_group_overrides(["backbone=nope"])
    assert msg.startswith("backbone=nope") and "tiny" in msg and "\n" not in msg
    assert check_group_overrides(["tau.value=1.5,2.8", "trainer.max_steps=3", "backbone=tiny"]) is None
    assert check_group_overrides(["-m", "stage=0,7"]).startswith("stage=7")  # multirun values are checked too


def test_a_recipe_for_another_stage_is_refused_in_one_line():
    """``experiment=tiny_stage1`` is a stage-1 recipe for the tiny backbone: with ``stage=0`` its
    values would land on the stage-0 module, with another backbone on a model it was not made for."""
    msg = check_group_overrides(["experiment=tiny_stage1", "stage=0"])
    assert msg.startswith("stage=0: experiment=tiny_stage1 is a recipe for stage=1") and "\n" not in msg
    assert check_group_overrides(["experiment=tiny_stage1", "backbone=smollm2_135m"]).startswith("backbone=smollm2_135m:")
    assert check_group_overrides(["-m", "experiment=tiny_stage1", "stage=1,0"]).startswith("stage=0:")
    assert check_group_overrides(["experiment=tiny_stage1", "stage=1", "backbone=tiny"]) is None
    assert check_group_overrides(["experiment=tiny_stage1", "data=gsm8k", "strategy=ddp"]) is None  # other groups: yours


def _compose_named(config_name: str, overrides: list[str]) -> DictConfig:
    from fluid.utils.compose import compose

    return compose(config_name, overrides)


def test_every_validation_rule_names_a_key_the_configs_have(tmp_path):
    """A rule whose key resolves in no composed config checks nothing: a key renamed in ``conf/``
    without renaming its rule would drop the check silently (validate.py skips a missing key,
    since not every stage or data group has every key). Every stage, data group and entry point
    composes here, and every rule's key must resolve in at least one of them."""
    from fluid.validate import ALL_RULES

    configs = [_compose_named("evaluate", []), _compose_named("generate", [])]
    for stage in ("0", "1", "2"):
        for data in ("arith", "gsm8k", "jsonl"):
            extra = ["data.source.train_path=x.jsonl"] if data == "jsonl" else []
            configs.append(_compose_named("train", [f"stage={stage}", f"data={data}", *extra]))
    missing = [key for key in ALL_RULES
               if all(OmegaConf.select(c, key, default="<missing>", throw_on_missing=False) == "<missing>"
                      for c in configs)]
    assert not missing, f"validation rules whose key no config has (renamed in conf/?): {missing}"


def test_constructors_apply_the_validators_rules():
    """A value that reaches a constructor without ``validate_train`` (Python use) fails with the
    same one line as the config check: one definition of each range."""
    from fluid.khead.frozen import resolve_lane_forward
    from fluid.modules.lora import LoraSettings
    from fluid.modules.optim import OptimConfig, build_optimizer
    from fluid.validate import ALL_RULES

    cases = [("stage.module.lora.scope", lambda: LoraSettings(scope="everything")),
             ("stage.module.optim.scheduler",
              lambda: build_optimizer([torch.nn.Parameter(torch.zeros(1))], OptimConfig(scheduler="linear"), 10)),
             ("stage.module.lane_forward", lambda: resolve_lane_forward("sideways", "cpu"))]
    for key, make in cases:
        with pytest.raises(FluidConfigError) as e:
            make()
        assert str(e.value).startswith(f"{key}: {ALL_RULES[key][1]}, got ")

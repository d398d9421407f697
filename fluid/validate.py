"""The one place that checks a composed config before any heavy work (model, data, trainer).

Every failure is a :class:`FluidConfigError`: one line naming the key and the fix, exit 2 from
the command line. ``fluid.train`` calls :func:`validate_train`, ``fluid.generate``
:func:`validate_generate`; later entry points add their own rules here.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from fluid.utils.errors import FluidConfigError

_MISSING = object()


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def int_at_least(lo: int) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: _is_int(v) and v >= lo), f"must be an integer >= {lo}"


def number_in(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> tuple[Callable[[Any], bool], str]:
    def ok(v) -> bool:
        return _is_num(v) and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)

    interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    return ok, f"must be a finite number in {interval}"


def positive() -> tuple[Callable[[Any], bool], str]:
    return (lambda v: _is_num(v) and v > 0), "must be a finite number > 0"


def one_of(*options: str) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v in options), f"must be one of {' | '.join(options)}"


INF = math.inf
# key -> (check, what it must be). A key the composed config does not have is not checked (a stage
# or data group without it); tests/test_configs.py composes every stage and entry point and fails
# when a rule's key resolves in none of them (a renamed key would otherwise drop its check silently).
TRAIN_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "seed": int_at_least(0),
    "trainer.max_steps": int_at_least(1),
    "trainer.accumulate_grad_batches": int_at_least(1),
    "trainer.log_every_n_steps": int_at_least(1),
    "trainer.devices": ((lambda v: v == "auto" or (_is_int(v) and v >= 1) or isinstance(v, (list, str))),
                        "must be an integer >= 1, a list of device ids or auto"),
    "trainer.num_nodes": int_at_least(1),
    "trainer.val_check_interval": ((lambda v: v is None or (_is_num(v) and v > 0)),
                                   "must be > 0 (steps, or a fraction of an epoch)"),
    "trainer.limit_val_batches": ((lambda v: _is_num(v) and v >= 0), "must be >= 0"),
    "trainer.gradient_clip_val": ((lambda v: v is None or (_is_num(v) and v >= 0)), "must be >= 0 or null"),
    "stage.module.optim.lr": positive(),
    "stage.module.optim.weight_decay": number_in(0, INF, hi_open=True),
    "stage.module.optim.warmup_ratio": number_in(0, 1, hi_open=True),
    "stage.module.optim.min_lr_ratio": number_in(0, 1),
    "stage.module.optim.scheduler": one_of("cosine", "constant"),
    "stage.module.attention": one_of("auto", "dense", "flex"),
    "stage.module.lane_forward": one_of("auto", "prefix", "expanded"),
    "stage.module.lane_chunk": int_at_least(1),
    "stage.module.target_k_taus": ((lambda v: v is None or ((OmegaConf.is_list(v) or isinstance(v, (list, tuple))) and all(
        isinstance(t, (int, float)) and not isinstance(t, bool) and 0 < t < INF for t in v))),
        "must be a list of numbers > 0 or null"),
    "stage.module.horizon": ((lambda v: v is None or (_is_int(v) and v >= 1)), "must be an integer >= 1 or null"),
    "stage.module.anchor_prob": number_in(0, 1, lo_open=True),
    "stage.module.eval_max_new_tokens": int_at_least(1),
    "stage.module.max_expanded_len": ((lambda v: v is None or (_is_int(v) and v >= 2)), "must be an integer >= 2 or null"),
    "stage.module.pad_to_multiple": int_at_least(1),
    "stage.module.loss.reduction": one_of("joint", "separate"),
    "stage.module.loss.ar_weight": number_in(0, INF, hi_open=True),
    "stage.module.loss.diff_weight": number_in(0, INF, hi_open=True),
    "stage.module.loss.lane_target": one_of("token", "teacher"),
    "stage.module.loss.teacher_weight": number_in(0, 1),
    "stage.module.loss.teacher_topk": ((lambda v: v is None or (_is_int(v) and v >= 1)), "must be an integer >= 1 or null"),
    "stage.module.loss.depth_decay": ((lambda v: v is None or (_is_num(v) and v > 0)), "must be a number > 0 or null"),
    "data.batch_size": int_at_least(1),
    "data.eval_batch_size": int_at_least(1),
    "data.global_batch_size": ((lambda v: v is None or (_is_int(v) and v >= 1)), "must be an integer >= 1 or null"),
    "data.max_length": int_at_least(2),
    "data.num_workers": int_at_least(0),
    "data.responses": ((lambda v: v is None or v in ("gold", "self")), "must be gold or self"),
    "data.self_responses.max_new_tokens": ((lambda v: v is None or (_is_int(v) and v >= 1)), "must be an integer >= 1"),
    "data.self_responses.batch_size": ((lambda v: v is None or (_is_int(v) and v >= 1)), "must be an integer >= 1"),
}
LORA_RULES = {
    "stage.module.lora.r": int_at_least(1),
    "stage.module.lora.alpha": positive(),
    "stage.module.lora.dropout": number_in(0, 1, hi_open=True),
    "stage.module.lora.scope": one_of("all", "lanes"),
}
# the groups a stage consumes (``stage.consumes``)
GROUP_RULES = {
    "masking": {"masking.anchor_prob": number_in(0, 1, lo_open=True), "masking.horizon": int_at_least(1),
                "masking.noise_prob": number_in(0, 1, hi_open=True)},
    "tau": {"tau.value": positive(), "tau.sigma": positive()},
}
# top-level keys of ``conf/train.yaml`` and its groups; anything else is a typo or an unsupported option
TRAIN_KEYS = {"ckpt_path", "task_name", "run_name", "run_tags", "seed", "test", "publish", "paths",
              "stage", "backbone", "data", "masking", "tau", "trainer", "strategy", "logger", "callbacks", "debug",
              "experiment", "optimized_metric", "hydra"}


# fluid.evaluate's own keys (its decode settings are checked by fluid/decoding/setup.py)
EVALUATE_RULES = {
    "limit": ((lambda v: v is None or (_is_int(v) and v >= 1)), "must be a positive integer or null"),
    "repeats": int_at_least(1),
    "interleave": ((lambda v: v is None or (_is_int(v) and v >= 0)), "must be a number of prompts >= 0 or null"),
    "warmup": int_at_least(0),
    "confidences": ((lambda v: v is None or ((OmegaConf.is_list(v) or isinstance(v, (list, tuple))) and all(
        _is_num(c) and 0 <= c <= 1 for c in v))), "must be a list of numbers in [0, 1] or null"),
    "prompt_lookup_tokens": ((lambda v: v is None or (_is_int(v) and v >= 1)), "must be an integer >= 1 or null"),
}
ALL_RULES = {**TRAIN_RULES, **LORA_RULES, **{k: r for g in GROUP_RULES.values() for k, r in g.items()},
             **EVALUATE_RULES}


def check(key: str, value) -> None:
    """The rule of config key ``key`` applied to ``value``: constructors that take a value from
    the config call this instead of repeating the range (one definition per rule)."""
    ok, must = ALL_RULES[key]
    if not ok(value):
        raise FluidConfigError(key, f"{must}, got {value!r}")


def check_rules(cfg: DictConfig, rules: dict[str, tuple[Callable[[Any], bool], str]]) -> None:
    for key, (ok, must) in rules.items():
        value = OmegaConf.select(cfg, key, default=_MISSING)
        if value is _MISSING:
            continue
        if not ok(value):
            raise FluidConfigError(key, f"{must}, got {value!r}")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def torch_dtype(name, key: str = "dtype"):
    """The torch dtype of a config name (the backbone configs' table: float32/fp32, bfloat16/bf16, ...)."""
    import torch

    from fluid.backbones.spec import DTYPES

    if isinstance(name, torch.dtype) and name in DTYPES.values():
        return name
    if name not in DTYPES:
        raise FluidConfigError(key, f"unknown {name!r}", f"use float32 (lossless), bfloat16 or float16 ({', '.join(DTYPES)})")
    return DTYPES[name]


def resolve_device(name, key: str = "device", fallback: bool = False) -> str:
    """``auto`` (or None) -> cuda when there is a GPU, else cpu; ``cuda[:N]`` only when CUDA is
    available, except with ``fallback`` (lm-eval's CLI passes cuda:0 unless told otherwise; like
    its HF model, the lm-eval model then warns and uses the CPU)."""
    name = "auto" if name is None else str(name)
    if name == "auto":
        return "cuda" if _cuda_available() else "cpu"
    if name != "cpu" and not name.startswith("cuda"):
        raise FluidConfigError(key, f"unknown {name!r}", "use auto, cpu or cuda[:N]")
    if name.startswith("cuda") and not _cuda_available():
        if fallback:
            logging.getLogger("fluid").warning("%s=%s: no CUDA device, using cpu", key, name)
            return "cpu"
        raise FluidConfigError(key, f"{name!r} but CUDA is not available", f"use {key}=cpu or {key}=auto")
    return name


def check_devices(cfg: DictConfig) -> None:
    accelerator = str(OmegaConf.select(cfg, "trainer.accelerator", default="auto"))
    if accelerator in ("gpu", "cuda") and not _cuda_available():
        raise FluidConfigError("trainer.accelerator", f"{accelerator!r} but CUDA is not available",
                               "use trainer.accelerator=auto or trainer=cpu")
    target = str(OmegaConf.select(cfg, "strategy._target_", default="") or "")
    name = str(OmegaConf.select(cfg, "strategy.name", default="") or "")
    if (target.startswith("lightning") and "DeepSpeed" in target or "deepspeed" in name) and not _cuda_available():
        raise FluidConfigError("strategy", "DeepSpeed runs on CUDA GPUs only, and there is none",
                               "use strategy=auto (one device) or strategy=ddp on CPU")
    if target.startswith("lightning") and "FSDP" in target and not _cuda_available():
        raise FluidConfigError("strategy", "Lightning's FSDP runs on CUDA GPUs only, and there is none",
                               "use strategy=auto (one device) or strategy=ddp on CPU")


def check_init_checkpoint(cfg: DictConfig) -> None:
    """Stage 2 starts from a stage-1 checkpoint (one with lanes and a MASK token)."""
    init = OmegaConf.select(cfg, "stage.init_checkpoint", default=None)
    if not init:
        return
    path = Path(init)
    if not path.exists():
        raise FluidConfigError("stage.init_checkpoint", f"{init!r} does not exist",
                               f"run stage {cfg.stage.id - 1} first or set stage.init_checkpoint=DIR")
    meta = path / "fluid.json"
    stage = json.loads(meta.read_text()).get("stage") if meta.exists() else None
    want = cfg.stage.id - 1
    if stage != want:
        raise FluidConfigError("stage.init_checkpoint", f"{init!r} is a {'stage-' + str(stage) if stage is not None else 'plain'}"
                               f" checkpoint; stage {cfg.stage.id} trains on a stage-{want} one",
                               f"point it at the stage-{want} run's checkpoint/")


def validate_train(cfg: DictConfig) -> None:
    """Everything about a ``fluid.train`` config that can be known before a model is built."""
    unknown = sorted(set(cfg.keys()) - TRAIN_KEYS)
    if unknown:
        raise FluidConfigError(unknown[0], "is not a fluid.train option (a typo?)",
                               f"top-level keys: {', '.join(sorted(TRAIN_KEYS - {'hydra'}))}")
    check_rules(cfg, TRAIN_RULES)
    if OmegaConf.select(cfg, "stage.module.lora.enabled", default=False):
        check_rules(cfg, LORA_RULES)
    elif OmegaConf.select(cfg, "stage.module.lora.scope", default="all") == "lanes":
        raise FluidConfigError("stage.module.lora.scope", "lanes (exact mode) gates a LoRA update, but "
                               "stage.module.lora.enabled is false", "set stage.module.lora.enabled=true")
    if (OmegaConf.select(cfg, "stage.module.loss.lane_target", default="token") == "teacher"
            and not (OmegaConf.select(cfg, "stage.module.lora.enabled", default=False)
                     and OmegaConf.select(cfg, "stage.module.lora.scope", default="all") == "lanes")):
        raise FluidConfigError("stage.module.loss.lane_target", "teacher needs exact mode, where the main tokens' "
                               "logits are the original model's", "add stage.module.lora.scope=lanes")
    for group in cfg.stage.get("consumes", []) or []:
        check_rules(cfg, GROUP_RULES.get(group, {}))
    publish = cfg.stage.get("publish") if cfg.get("publish", True) else None
    if publish:  # found before training, not when the finished run is linked
        from fluid.config import creatable

        why = creatable(Path(publish).parent)
        if why:
            raise FluidConfigError("paths.artifacts_dir", why, "set paths.artifacts_dir=DIR or publish=false")
    check_devices(cfg)
    check_init_checkpoint(cfg)


def validate_evaluate(cfg: DictConfig) -> None:
    """``fluid.evaluate``: its own keys, device and dtype (the decode settings: fluid/decoding/setup.py)."""
    check_rules(cfg, EVALUATE_RULES)
    resolve_device(cfg.device)
    torch_dtype(cfg.dtype)


def validate_generate(cfg: DictConfig) -> None:
    """``fluid.generate``: prompts, device and dtype (the decode node is checked by DecodeConfig)."""
    prompts = cfg.get("prompts")
    if OmegaConf.is_list(prompts):
        prompts = OmegaConf.to_container(prompts, resolve=True)
    if prompts is not None and not isinstance(prompts, list):
        raise FluidConfigError("prompts", f"must be a list of prompts, got {prompts!r}",
                               "quote a list: prompts='[\"How many ...?\"]'")
    if isinstance(prompts, list) and not all(isinstance(p, (str, list)) and p for p in prompts):
        raise FluidConfigError("prompts", "every prompt must be a non-empty string or a list of chat messages")
    resolve_device(cfg.device)
    torch_dtype(cfg.dtype)
    if cfg.get("output"):  # found before decoding, not after it
        from fluid.config import creatable

        out = Path(cfg.output)
        why = f"{str(out)!r} is a directory" if out.is_dir() else creatable(out.parent)
        if why:
            raise FluidConfigError("output", why, "give a file path in a writable directory")


def world_size(cfg: DictConfig) -> int:
    """Devices x nodes the trainer will run on (``auto`` / -1: every visible GPU, else 1)."""
    devices = OmegaConf.select(cfg, "trainer.devices", default=1)
    if isinstance(devices, str) and devices != "auto":
        devices = [d for d in devices.split(",") if d.strip()]
    if OmegaConf.is_list(devices) or isinstance(devices, list):
        n = len(devices)
    elif devices in ("auto", -1):
        import torch

        n = max(1, torch.cuda.device_count()) if _cuda_available() else 1
    else:
        n = int(devices)
    return n * int(OmegaConf.select(cfg, "trainer.num_nodes", default=1) or 1)


def derive_batch(global_batch: int, max_per_device: int, world: int) -> tuple[int, int]:
    """(per-device batch, gradient accumulation) that make ``global_batch`` on ``world`` devices:
    the largest per-device batch up to ``max_per_device`` that divides it evenly."""
    if not _is_int(global_batch) or global_batch < 1:
        raise FluidConfigError("data.global_batch_size", f"must be an integer >= 1 or null, got {global_batch!r}")
    if global_batch % world:
        raise FluidConfigError("data.global_batch_size", f"{global_batch} is not divisible by the {world} devices",
                               "pick a multiple of the device count")
    per_rank = global_batch // world
    per_device = max(b for b in range(1, min(max_per_device, per_rank) + 1) if per_rank % b == 0)
    return per_device, per_rank // per_device

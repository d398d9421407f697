"""Exact mode (``stage.module.lora.scope=lanes``): the adaptation acts at MASK slots only.

Every LoRA update and the learned MASK embedding are multiplied by a per-token gate that is 1
where the input token is the MASK and 0 elsewhere, so every other token runs the original
weights exactly (``x + 0 * delta`` is ``x``). Main tokens never attend to lane slots (the strictly
causal rule), so the adapted model's AR path *is* the original model: its logits on any
sequence without MASK tokens are the original model's, and lossless FLUID decoding returns the
original checkpoint's greedy output. In training, lane slots holding a MASK take the update; a
lane slot restored to a real token runs the original weights, as a drafted token does when it is
verified at decode time.

The gate is computed from the token ids by a hook on the input embedding, so nothing that calls
the model has to pass it. A MASK row that stage 1 added has an output the original lacks: the gate sets
its logit to the lowest value, so no forward ever emits it. The checkpoint keeps the original weights unmerged, with the adapter
and the MASK embedding in ``<checkpoint>/lane_adapter/``; :func:`attach` puts them back.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

LANE_ADAPTER_DIR = "lane_adapter"
GATE_FILE = "lane_gate.safetensors"
ATTR = "fluid_lane_gate"  # the gate's name as a submodule of the Hugging Face model


class LaneGate(nn.Module):
    """The per-token gate of a LoRA-injected model, and the MASK embedding offset it gates."""

    def __init__(self, hidden_size: int, mask_token_id: int, train_mask_embedding: bool = True,
                 mask_added: bool = False):
        super().__init__()
        self.mask_token_id = int(mask_token_id)
        # the MASK row was added by stage 1: the original model has no such output, so neither may
        # the adapted one (its logit is set to the lowest value; the original vocabulary is untouched)
        self.mask_added = bool(mask_added)
        self.mask_delta = nn.Parameter(torch.zeros(hidden_size), requires_grad=train_mask_embedding)
        self._gate: torch.Tensor | None = None
        self._handles: list = []
        self._layers: list = []

    def install(self, model: nn.Module) -> "LaneGate":
        """Hook the embedding of ``model`` (a Hugging Face causal LM with LoRA layers injected,
        or a peft model around one) and every LoRA ``B`` projection; registers itself on it."""
        from peft.tuners.lora import LoraLayer

        hf = model.get_base_model() if hasattr(model, "get_base_model") else model
        self._handles.append(hf.get_input_embeddings().register_forward_hook(self._embed, with_kwargs=True))
        n = 0
        for m in hf.modules():
            if isinstance(m, LoraLayer):
                self._layers.append(m)
                for b in m.lora_B.values():
                    self._handles.append(b.register_forward_hook(self._lora))
                    n += 1
        if n == 0:
            self.remove()
            raise ValueError("lora.scope=lanes: the model has no LoRA layers to gate")
        if self.mask_added:
            self._handles.append(hf.get_output_embeddings().register_forward_hook(self._no_mask_output))
        setattr(hf, ATTR, self)
        return self

    def _no_mask_output(self, module, args, out: torch.Tensor) -> torch.Tensor:
        idx = torch.tensor([self.mask_token_id], device=out.device)
        return out.index_fill(-1, idx, torch.finfo(out.dtype).min)

    def _embed(self, module, args, kwargs, out: torch.Tensor) -> torch.Tensor:
        ids = args[0] if args else kwargs["input"]
        gate = (ids == self.mask_token_id).unsqueeze(-1).to(out.dtype)
        self._gate = gate
        # a forward without MASK slots (an AR step, a plain forward) skips the LoRA maths
        # altogether: it runs at the original model's cost, not just with its result
        on = bool(gate.any())
        for m in self._layers:
            m._disable_adapters = not on
        return out + gate * self.mask_delta.to(out.dtype)

    def _lora(self, module, args, out: torch.Tensor) -> torch.Tensor:
        if self._gate is None or self._gate.shape[:-1] != out.shape[:-1]:
            raise RuntimeError("lora.scope=lanes: the model was called without input_ids (inputs_embeds cannot "
                               "be gated)")
        return out * self._gate

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for m in self._layers:
            m._disable_adapters = False
        self._layers.clear()

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        save_file({"mask_delta": self.mask_delta.detach().float().cpu().contiguous(),
                   "mask_token_id": torch.tensor([self.mask_token_id]),
                   "mask_added": torch.tensor([int(self.mask_added)])}, str(path))

    @classmethod
    def load(cls, path: Path) -> "LaneGate":
        from safetensors.torch import load_file

        t = load_file(str(path))
        gate = cls(t["mask_delta"].numel(), int(t["mask_token_id"][0]), train_mask_embedding=False,
                   mask_added=bool(t["mask_added"][0]) if "mask_added" in t else False)
        with torch.no_grad():
            gate.mask_delta.copy_(t["mask_delta"])
        return gate


def gate_of(model: nn.Module) -> LaneGate | None:
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(hf, ATTR, None)


def apply_lanes_lora(model: nn.Module, peft_config, mask_token_id: int, train_mask_embedding: bool,
                     mask_added: bool = False) -> nn.Module:
    """``model`` wrapped with LoRA (``peft_config``) gated to MASK slots, plus the MASK offset;
    ``mask_added``: the MASK row is new (stage 1 added it), so its output is suppressed."""
    from peft import get_peft_model

    peft_model = get_peft_model(model, peft_config)
    hf = peft_model.get_base_model()
    gate = LaneGate(hf.config.get_text_config().hidden_size, mask_token_id, train_mask_embedding, mask_added)
    gate.to(device=hf.get_input_embeddings().weight.device, dtype=hf.get_input_embeddings().weight.dtype)
    gate.install(peft_model)
    return peft_model


def save_lane_adapter(peft_model: nn.Module, out: Path) -> None:
    """Write the adapter and the MASK offset to ``out/lane_adapter``."""
    adapter = Path(out) / LANE_ADAPTER_DIR
    peft_model.save_pretrained(adapter)
    gate_of(peft_model).save(adapter / GATE_FILE)


def unload_lanes(peft_model: nn.Module) -> nn.Module:
    """The original model: LoRA layers and the MASK hooks removed, weights unmerged."""
    gate = gate_of(peft_model)
    gate.remove()
    delattr(peft_model.get_base_model(), ATTR)
    return peft_model.unload()


def has_lane_adapter(directory: str | Path) -> bool:
    return (Path(directory) / LANE_ADAPTER_DIR / GATE_FILE).exists()


def attach(model: nn.Module, directory: str | Path) -> nn.Module:
    """The exact-mode model of checkpoint ``directory``: ``model`` (its original weights) with the
    saved adapter and MASK offset gated to MASK slots; ``model`` itself when there is none."""
    if not has_lane_adapter(directory):
        return model
    from peft import PeftModel

    adapter = Path(directory) / LANE_ADAPTER_DIR
    hf = PeftModel.from_pretrained(model, adapter).get_base_model()  # the LoRA layers stay injected
    gate = LaneGate.load(adapter / GATE_FILE)
    gate.to(device=hf.get_input_embeddings().weight.device, dtype=hf.get_input_embeddings().weight.dtype)
    gate.install(hf)
    return hf

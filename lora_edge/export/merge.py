"""Merge, branch and unmerge a PEFT LoRA adapter at the torch level (no ONNX here).

For every targeted linear layer LoRA adds ``ΔW = s · B·A`` (``A ∈ R^{r×in}``,
``B ∈ R^{out×r}``). This module turns a PEFT model (the PyTorch reference, see
:func:`lora_edge.core.adapters.load_reference`) into plain transformers modules that
the exporter can trace:

* :func:`merge_adapter` -- ``W' = W + s·B·A`` computed in fp32, checked finite,
  cast back to the base dtype: the model has no LoRA left in it.
* :func:`branch_adapter` -- each LoRA layer becomes a :class:`LoraBranch`
  computing ``base(x) + (x·Aᵀ)·(s·B)ᵀ``: the scale folded into B, no dropout,
  the small matmul first, the factors stored pre-transposed so that the traced
  graph uses them as they are (no Transpose folded into an anonymous
  initializer) and their ONNX initializer names keep ``lora_A`` / ``lora_B``.
* :func:`unmerge_adapter` -- subtracts the deltas again and restores the base
  heads: the base model back, within fp32 rounding.

``modules_to_save`` (e.g. a classifier head) belong to the adapter: every form
takes the adapter's copy. The reference PEFT model is never modified: the forms
are built on a deep copy.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from lora_edge.core.errors import AdapterMismatchError, ExportError

if TYPE_CHECKING:
    from peft import PeftModel

# The prefix PEFT puts before module paths in adapter files and in PeftModel.named_modules().
PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoraPair:
    """One targeted layer's LoRA factors, as the active adapter defines them.

    ``module`` is the layer's path inside the base model (no PEFT prefix);
    ``lora_A`` is ``[r, in]`` and ``lora_B`` ``[out, r]``, both fp32 and detached;
    ``scale`` is the PEFT layer's own scaling (alpha/r, alpha/sqrt(r) with rsLoRA,
    per-layer values from rank/alpha patterns). ``fan_in_fan_out`` is true for
    GPT-2 style Conv1D layers whose weight is stored ``[in, out]``.
    """

    module: str
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scale: float
    fan_in_fan_out: bool

    @property
    def rank(self) -> int:
        """The pair's rank r."""
        return int(self.lora_A.shape[0])

    @property
    def key_A(self) -> str:
        """PEFT's adapter-file key for A (also the hot-swap graph input name)."""
        return f"{PEFT_PREFIX}{self.module}.lora_A.weight"

    @property
    def key_B(self) -> str:
        """PEFT's adapter-file key for B (also the hot-swap graph input name)."""
        return f"{PEFT_PREFIX}{self.module}.lora_B.weight"

    def scaled_B(self) -> torch.Tensor:
        """``s·B`` in fp32: the form in which B enters branched and hot-swap graphs."""
        return self.lora_B * self.scale

    def delta_weight(self) -> torch.Tensor:
        """``s·B·A`` in fp32, laid out like the base layer's weight (transposed for Conv1D)."""
        delta = (self.lora_B @ self.lora_A) * self.scale
        return delta.T if self.fan_in_fan_out else delta


class LoraBranch(nn.Module):
    """A base linear layer plus an explicit low-rank branch: ``base(x) + (x·Aᵀ)·(s·B)ᵀ``.

    ``lora_A`` holds ``Aᵀ`` (``[in, r]``) and ``lora_B`` holds ``(s·B)ᵀ`` (``[r, out]``),
    so the forward is two plain matmuls on the parameters as stored: the exporter
    keeps them as named initializers (``...lora_A`` / ``...lora_B``), which the
    LoRA-aware quantizer relies on to leave the pair in float. The ``[in, r]``
    product comes first: ``x·Aᵀ`` is the cheap one (r ≪ out).
    """

    def __init__(self, base_layer: nn.Module, lora_A_t: torch.Tensor, lora_B_t: torch.Tensor):
        super().__init__()
        self.base_layer = base_layer
        self.lora_A = nn.Parameter(lora_A_t.contiguous(), requires_grad=False)
        self.lora_B = nn.Parameter(lora_B_t.contiguous(), requires_grad=False)

    @classmethod
    def from_pair(cls, base_layer: nn.Module, pair: LoraPair) -> "LoraBranch":
        """The branch for ``pair`` beside ``base_layer``, in the base layer's dtype."""
        dtype = _weight_of(base_layer).dtype
        return cls(base_layer, pair.lora_A.T.to(dtype), pair.scaled_B().T.to(dtype))

    @property
    def rank(self) -> int:
        """The branch's rank (0 for an empty branch, which adds nothing)."""
        return int(self.lora_A.shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Base output plus the low-rank branch."""
        return self.base_layer(x) + torch.matmul(torch.matmul(x, self.lora_A), self.lora_B)


def _weight_of(layer: nn.Module) -> torch.Tensor:
    weight = getattr(layer, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise AdapterMismatchError(f"LoRA on a {layer.__class__.__name__} layer is not supported", None,
                                   "target nn.Linear or Conv1D layers only")
    return weight


def _lora_layers(peft_model: "PeftModel") -> list[tuple[str, nn.Module]]:
    """(module path without PEFT prefix, PEFT LoRA layer) for every LoRA layer of the model."""
    from peft.tuners.lora import LoraLayer

    return [(name.removeprefix(PEFT_PREFIX), module) for name, module in peft_model.named_modules()
            if isinstance(module, LoraLayer)]


def saved_module_wrappers(peft_model: "PeftModel") -> list[tuple[str, nn.Module]]:
    """(module path, PEFT ModulesToSaveWrapper) for every modules_to_save entry."""
    from peft.utils import ModulesToSaveWrapper

    return [(name.removeprefix(PEFT_PREFIX), module) for name, module in peft_model.named_modules()
            if isinstance(module, ModulesToSaveWrapper)]


def lora_pairs(peft_model: "PeftModel") -> list[LoraPair]:
    """The active adapter's LoRA pair of every targeted layer, in module order.

    Raises AdapterMismatchError for LoRA flavours the deployment forms cannot express
    (embedding/conv LoRA, lora_bias, DoRA, an already merged layer).
    """
    pairs = []
    for module, layer in _lora_layers(peft_model):
        adapter = _active_adapter(layer, module)
        if adapter not in getattr(layer, "lora_A", {}):
            raise AdapterMismatchError(f"LoRA layer '{module}' ({layer.__class__.__name__}) is not a linear LoRA layer",
                                       module, "target nn.Linear or Conv1D layers only")
        if layer.merged:
            raise AdapterMismatchError(f"LoRA layer '{module}' is already merged", module,
                                       "pass an unmerged PeftModel (load_reference)")
        if getattr(layer, "lora_bias", {}).get(adapter) or layer.lora_B[adapter].bias is not None:
            raise AdapterMismatchError("adapters with lora_bias=True are not supported", module,
                                       "train the adapter with lora_bias=False")
        if getattr(layer, "use_dora", {}).get(adapter):
            raise AdapterMismatchError("DoRA adapters are not supported", module, "train a plain LoRA adapter")
        lora_A = layer.lora_A[adapter].weight.detach().float().clone()
        lora_B = layer.lora_B[adapter].weight.detach().float().clone()
        if lora_A.dim() != 2:
            raise AdapterMismatchError(f"LoRA layer '{module}' is not a linear layer", module,
                                       "target nn.Linear or Conv1D layers only")
        pairs.append(LoraPair(module, lora_A, lora_B, float(layer.scaling[adapter]), bool(layer.fan_in_fan_out)))
    return pairs


def _active_adapter(layer: nn.Module, where: str) -> str:
    active = list(layer.active_adapters)
    if len(active) != 1:
        raise AdapterMismatchError(f"{len(active)} adapters are active on '{where}'", where,
                                   "activate exactly one adapter (PeftModel.set_adapter)")
    return active[0]


def _plain_copy(peft_model: "PeftModel") -> tuple[nn.Module, "PeftModel"]:
    """A deep copy of the PEFT model and its inner transformers model, with the adapter's heads in place.

    Every ModulesToSaveWrapper in the copy is replaced by the adapter's copy of the module.
    """
    with warnings.catch_warnings():  # deepcopy reads deprecated transformers properties; nothing to act on
        warnings.simplefilter("ignore", FutureWarning)
        clone = copy.deepcopy(peft_model)
    inner = clone.base_model.model
    inner.__dict__.pop("peft_config", None)  # PEFT's marker: the result is a plain transformers model
    for module, wrapper in saved_module_wrappers(clone):
        inner.set_submodule(module, wrapper.modules_to_save[_active_adapter(wrapper, module)])
    return inner, clone


def base_view(peft_model: "PeftModel") -> nn.Module:
    """The base model under ``peft_model`` as a plain transformers model that SHARES its tensors (no weight copy).

    LoRA layers become their base layers and ``modules_to_save`` wrappers their
    original (base) modules. Only the module tree is copied, so the view costs no
    memory for weights; it must not be modified in place where the reference is
    still needed (replacing submodules, as the hot-swap form does, is fine).
    """
    import itertools

    memo = {id(tensor): tensor for tensor in itertools.chain(peft_model.parameters(), peft_model.buffers())}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        clone = copy.deepcopy(peft_model, memo)
    inner = clone.base_model.model
    inner.__dict__.pop("peft_config", None)
    for module, layer in _lora_layers(clone):
        inner.set_submodule(module, layer.get_base_layer())
    for module, wrapper in saved_module_wrappers(clone):
        inner.set_submodule(module, wrapper.original_module)
    return inner


def merge_adapter(peft_model: "PeftModel") -> nn.Module:
    """The base model with the adapter folded in: ``W' = W + s·B·A`` per targeted layer.

    The sum is computed in fp32, checked finite, and cast back to the layer's dtype.
    Returns a plain transformers model (no PEFT modules left); ``peft_model`` is unchanged.
    Raises ExportError naming the layer when a merged weight is not finite.
    """
    pairs = lora_pairs(peft_model)
    inner, clone = _plain_copy(peft_model)
    layers = dict(_lora_layers(clone))
    with torch.no_grad():
        for pair in pairs:
            base_layer = layers[pair.module].get_base_layer()
            weight = _weight_of(base_layer)
            merged = weight.float() + _checked_delta(pair, weight)
            if not torch.isfinite(merged).all() or not torch.isfinite(merged.to(weight.dtype)).all():
                raise ExportError(f"merged weight of '{pair.module}' is not finite in {weight.dtype}",
                                  pair.module, "use the branched form, or a wider dtype for the base model")
            weight.copy_(merged.to(weight.dtype))
            inner.set_submodule(pair.module, base_layer)
    return inner


def _checked_delta(pair: LoraPair, weight: torch.Tensor) -> torch.Tensor:
    delta = pair.delta_weight()
    if delta.shape != weight.shape:
        raise AdapterMismatchError(f"LoRA delta of '{pair.module}' has shape {tuple(delta.shape)}, "
                                   f"the layer's weight {tuple(weight.shape)}", pair.module,
                                   "check fan_in_fan_out in the adapter config (true for GPT-2 Conv1D)")
    return delta


def unmerge_adapter(merged_model: nn.Module, peft_model: "PeftModel") -> nn.Module:
    """Undo :func:`merge_adapter` in place: ``W = W' - s·B·A`` (fp32) and the base heads restored.

    ``peft_model`` supplies the LoRA pairs and the base copies of the saved modules.
    Returns ``merged_model``, which equals the base model again within fp32 rounding.
    """
    with torch.no_grad():
        for pair in lora_pairs(peft_model):
            weight = _weight_of(merged_model.get_submodule(pair.module))
            weight.copy_((weight.float() - _checked_delta(pair, weight)).to(weight.dtype))
        for module, wrapper in saved_module_wrappers(peft_model):
            original = wrapper.original_module
            merged_model.get_submodule(module).load_state_dict(original.state_dict())
    return merged_model


def branch_adapter(peft_model: "PeftModel") -> nn.Module:
    """The base model with each LoRA layer replaced by a :class:`LoraBranch` (scale folded into B).

    Returns a plain transformers model whose targeted layers compute
    ``base(x) + (x·Aᵀ)·(s·B)ᵀ`` with no dropout; ``peft_model`` is unchanged.
    """
    pairs = lora_pairs(peft_model)
    inner, clone = _plain_copy(peft_model)
    layers = dict(_lora_layers(clone))
    for pair in pairs:
        base_layer = layers[pair.module].get_base_layer()
        _checked_delta(pair, _weight_of(base_layer))
        inner.set_submodule(pair.module, LoraBranch.from_pair(base_layer, pair))
    return inner


def branch_modules(base_model: nn.Module, shapes: dict[str, tuple[int, int]]) -> nn.Module:
    """Put an empty (rank-0) :class:`LoraBranch` on each named layer of ``base_model``, in place.

    ``shapes`` maps module path -> (in_features, out_features). Rank-0 branches add
    nothing; the hot-swap exporter replaces their factors with graph inputs.
    """
    for module, (fan_in, fan_out) in shapes.items():
        base_layer = base_model.get_submodule(module)
        dtype = _weight_of(base_layer).dtype
        branch = LoraBranch(base_layer, torch.zeros(fan_in, 0, dtype=dtype), torch.zeros(0, fan_out, dtype=dtype))
        base_model.set_submodule(module, branch)
    return base_model


def count_branches(model: nn.Module) -> int:
    """How many LoraBranch layers a model holds (one per targeted layer after :func:`branch_adapter`)."""
    return sum(isinstance(module, LoraBranch) for module in model.modules())



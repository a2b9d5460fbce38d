"""The hot-swap form: one base graph whose adapter tensors are graph inputs; adapters as .onnx_adapter files.

How it is built (docs/ARCHITECTURE.md, "Facts"): renaming initializers after a
plain export cannot work (the exporter folds transposes into anonymous
initializers), so the adapter's tensors are made explicit inputs of the
exported function. :class:`HotswapModule` takes the task's graph inputs plus one
tensor per :class:`SwapSlot` and calls ``torch.func.functional_call`` on the
task module, substituting them for the parameters of empty
:class:`~lora_edge.export.merge.LoraBranch` layers (and of the ``modules_to_save``
heads). After export, each such input gets a same-named initializer:

* LoRA ``A`` ``[0, in]`` and ``B`` ``[out, 0]`` (a dynamic rank axis), so that with
  no adapter fed the graph is the base model;
* head tensors the base model's values, so an adapter without a head uses the base head;
  a head axis that adapters size differently (their label counts) is dynamic.

Input names are PEFT's file keys (``base_model.model.<module>.lora_A.weight``);
B enters already multiplied by the layer's scale. An adapter becomes an ONNX
Runtime ``.onnx_adapter`` file (``onnxruntime.AdapterFormat``) holding those
tensors, activated per run with :func:`lora_edge.runtime.session.run` (``adapter=``):
switching adapters needs no new session.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from lora_edge.core.errors import AdapterMismatchError, ConfigError, ExportError
from lora_edge.export.exporter import ExportContext, GraphIO, graph_io_for
from lora_edge.export.merge import PEFT_PREFIX, saved_module_wrappers, branch_modules, lora_pairs

if TYPE_CHECKING:
    import numpy as np
    from peft import PeftModel

LORA_A, LORA_B, TENSOR = "lora_A", "lora_B", "tensor"
# Example rank used while tracing: torch.export specializes sizes 0 and 1, so anything >= 2.
TRACE_RANK = 2
ADAPTER_SUFFIX = ".onnx_adapter"


@dataclass(frozen=True)
class SwapSlot:
    """One adapter tensor the hot-swap graph takes as an input.

    ``name`` is the graph input name (PEFT's file key), ``module`` the base-model
    path of the layer it belongs to, ``kind`` lora_A / lora_B / tensor (a head
    parameter), ``attribute`` the parameter's name on that module, ``shape`` the
    default's shape (PEFT layout ``[0, in]`` / ``[out, 0]`` for LoRA, the base
    model's for a head), ``dynamic`` the (axis, dim name) pairs that vary: the
    rank of a LoRA factor, the label count of a head that adapters size differently.
    """

    name: str
    module: str
    kind: str
    attribute: str
    shape: tuple[int, ...]
    dynamic: tuple[tuple[int, str], ...] = ()

    @property
    def parameter(self) -> str:
        """The parameter's path in the model (``<module>.<attribute>``)."""
        return f"{self.module}.{self.attribute}"

    @property
    def rank_axis(self) -> int | None:
        """Which axis of the input is the rank (0 for A ``[r, in]``, 1 for B ``[out, r]``)."""
        return {LORA_A: 0, LORA_B: 1}.get(self.kind)

    def to_branch(self, tensor: torch.Tensor) -> torch.Tensor:
        """PEFT layout -> the layout the model's parameter has (LoraBranch stores Aᵀ and Bᵀ)."""
        return tensor.T if self.kind in (LORA_A, LORA_B) else tensor


def plan_slots(base_model: nn.Module, references: dict[str, "PeftModel"]) -> list[SwapSlot]:
    """The graph inputs a hot-swap graph needs to serve every adapter in ``references``.

    LoRA layers are the union of the adapters' targets (each with its own rank
    axis); head tensors the union of their ``modules_to_save``, with a dynamic
    axis wherever adapters size a head differently (e.g. their label counts), so
    one graph serves classifiers of different label sets.
    """
    lora: dict[str, tuple[int, int]] = {}
    heads: dict[str, tuple[str, str, tuple[int, ...], set]] = {}
    for adapter, reference in references.items():
        bias = getattr(reference.peft_config[reference.active_adapter], "bias", "none")
        if bias != "none":
            raise ConfigError(f"adapter '{adapter}' trains base biases (bias='{bias}'), which hot-swap cannot swap",
                              "--forms hotswap", "use the merged or branched form for this adapter")
        for pair in lora_pairs(reference):
            lora[pair.module] = (int(pair.lora_A.shape[1]), int(pair.lora_B.shape[0]))
        for module, wrapper in saved_module_wrappers(reference):
            for attribute, param in wrapper.modules_to_save[wrapper.active_adapter].named_parameters():
                base_shape = tuple(base_model.get_parameter(f"{module}.{attribute}").shape)
                if param.dim() != len(base_shape):
                    raise ConfigError(f"adapter '{adapter}' has '{module}.{attribute}' of shape {tuple(param.shape)}, "
                                      f"the base model {base_shape}", "--forms hotswap",
                                      "export this adapter in the merged or branched form")
                entry = heads.setdefault(f"{PEFT_PREFIX}{module}.{attribute}", (module, attribute, base_shape, set()))
                entry[3].add(tuple(param.shape))
    slots = []
    for index, (module, (fan_in, fan_out)) in enumerate(sorted(lora.items())):
        rank_dim = f"rank_{index}"
        slots.append(SwapSlot(f"{PEFT_PREFIX}{module}.lora_A.weight", module, LORA_A, "lora_A", (0, fan_in),
                              ((0, rank_dim),)))
        slots.append(SwapSlot(f"{PEFT_PREFIX}{module}.lora_B.weight", module, LORA_B, "lora_B", (fan_out, 0),
                              ((1, rank_dim),)))
    for name, (module, attribute, base_shape, shapes) in sorted(heads.items()):
        # Axes of one size share a dim (a classifier's weight rows and bias): torch.export needs them equal.
        dynamic = tuple((axis, f"head_{size}") for axis, size in enumerate(base_shape)
                        if any(shape[axis] != size for shape in shapes))
        slots.append(SwapSlot(name, module, TENSOR, attribute, base_shape, dynamic))
    return slots


def hotswap_base(base_model: nn.Module, slots: list[SwapSlot]) -> nn.Module:
    """Put empty LoraBranch layers on ``base_model`` (in place) where ``slots`` has LoRA inputs."""
    shapes = {slot.module: (slot.shape[1], 0) for slot in slots if slot.kind == LORA_A}
    for slot in slots:
        if slot.kind == LORA_B:
            shapes[slot.module] = (shapes[slot.module][0], slot.shape[0])
    return branch_modules(base_model, shapes)


class HotswapModule(nn.Module):
    """forward(*task_inputs, *slot_tensors): the task module with the slot tensors substituted for its parameters.

    torch.export traces ``torch.func.functional_call``; the TorchScript tracer refuses it
    ("the stateless API can't be used with Jitted modules"), so while it traces, the
    tensors are put in the modules' parameter tables for the call and the parameters
    restored afterwards (nothing else reads the model meanwhile).
    """

    def __init__(self, task_module: nn.Module, parameter_paths: list[str], slots: list[SwapSlot],
                 task_input_count: int):
        super().__init__()
        self.task_module = task_module
        self.parameter_paths = parameter_paths
        self.slots = slots
        self.task_input_count = task_input_count

    def forward(self, *inputs):
        task_inputs, adapter_inputs = inputs[:self.task_input_count], inputs[self.task_input_count:]
        overrides = {path: slot.to_branch(tensor)
                     for path, slot, tensor in zip(self.parameter_paths, self.slots, adapter_inputs)}
        if not torch.jit.is_tracing():
            return torch.func.functional_call(self.task_module, overrides, task_inputs)
        saved = []
        try:
            for path, tensor in overrides.items():
                owner_path, _, attribute = path.rpartition(".")
                owner = self.task_module.get_submodule(owner_path)
                saved.append((owner, attribute, owner._parameters[attribute]))
                owner._parameters[attribute] = tensor
            return self.task_module(*task_inputs)
        finally:
            for owner, attribute, parameter in reversed(saved):
                owner._parameters[attribute] = parameter


def _parameter_paths(task_module: nn.Module, model: nn.Module, slots: list[SwapSlot]) -> list[str]:
    """Where each slot's parameter sits inside ``task_module`` (found by identity, whatever the wrapper)."""
    paths = {id(param): name for name, param in task_module.named_parameters(remove_duplicate=False)}
    result = []
    for slot in slots:
        param = model.get_parameter(slot.parameter)
        if id(param) not in paths:
            raise ExportError(f"the task's graph wrapper does not hold the parameter of '{slot.module}'",
                              slot.name, "a graph-I/O builder must keep the model as a submodule")
        result.append(paths[id(param)])
    return result


def hotswap_graph_io(model: nn.Module, slots: list[SwapSlot], context: ExportContext) -> tuple[GraphIO, GraphIO]:
    """(hot-swap GraphIO, the task's GraphIO) for ``model`` (a :func:`hotswap_base` model)."""
    task_io = graph_io_for(context.task)(model, context)
    examples = []
    for slot in slots:
        if slot.kind == TENSOR:
            examples.append(model.get_parameter(slot.parameter).detach().clone())
        else:
            shape = [TRACE_RANK if axis == slot.rank_axis else size for axis, size in enumerate(slot.shape)]
            examples.append(torch.zeros(shape))
    module = HotswapModule(task_io.module, _parameter_paths(task_io.module, model, slots), slots,
                           len(task_io.input_names))
    axes = dict(task_io.dynamic_axes)
    axes.update({slot.name: dict(slot.dynamic) for slot in slots if slot.dynamic})
    io = GraphIO(module.eval(), task_io.example_inputs + tuple(examples), task_io.input_names + [s.name for s in slots],
                 task_io.output_names, axes, verify_inputs=[], dim_min=dict(task_io.dim_min))
    return io, task_io


def default_initializers(model: nn.Module, slots: list[SwapSlot]) -> Callable:
    """An ``export_onnx`` edit that gives every slot input a same-named initializer (its default)."""
    import numpy as np
    import onnx_ir as ir

    def edit(onnx_model) -> None:
        inputs = {value.name: value for value in onnx_model.graph.inputs}
        for slot in slots:
            if slot.kind == TENSOR:
                default = model.get_parameter(slot.parameter).detach().float().numpy().copy()
            else:
                default = np.zeros(slot.shape, dtype=np.float32)
            value = inputs[slot.name]
            value.const_value = ir.tensor(default, name=slot.name)
            onnx_model.graph.register_initializer(value)

    return edit


def add_default_initializers(model, heads: dict[str, "np.ndarray"], slots: list[SwapSlot]) -> None:
    """Give every slot input of the traced ONNX ``model`` a same-named initializer (its default), in place.

    ``heads`` holds the base values of the head slots (name -> array); LoRA factors default to empty.
    """
    import numpy as np
    from onnx import numpy_helper

    for slot in slots:
        default = heads[slot.name] if slot.kind == TENSOR else np.zeros(slot.shape, dtype=np.float32)
        model.graph.initializer.append(numpy_helper.from_array(default, slot.name))


def adapter_tensors(reference: "PeftModel", slots: list[SwapSlot]) -> dict[str, "np.ndarray"]:
    """The tensors of one adapter for a hot-swap graph: A, s·B (PEFT layout, fp32) and its head parameters."""
    wanted = {slot.name for slot in slots}
    tensors: dict[str, np.ndarray] = {}
    for pair in lora_pairs(reference):
        tensors[pair.key_A] = pair.lora_A.numpy()
        tensors[pair.key_B] = pair.scaled_B().numpy()
    for module, wrapper in saved_module_wrappers(reference):
        for attribute, param in wrapper.modules_to_save[wrapper.active_adapter].named_parameters():
            tensors[f"{PEFT_PREFIX}{module}.{attribute}"] = param.detach().float().numpy()
    missing = set(tensors) - wanted
    if missing:
        raise AdapterMismatchError(f"the hot-swap graph has no input for '{sorted(missing)[0]}'", "hotswap graph",
                                   "export the hot-swap graph with this adapter among --adapter")
    return {name: tensor.copy() for name, tensor in tensors.items()}

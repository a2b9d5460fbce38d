"""Layer stamping: trace a shallow twin of a decoder, then repeat its last layer's subgraph for the other layers.

Why: torch.export + ``run_decompositions`` cost grows with the program (SmolLM2-135M:
68 s for 30 layers, ~14 s for 2, most of it a fixed cost), while a decoder's layers
are the same subgraph over other weights. So the hot-swap graph is traced with
:data:`STAMP_DEPTH` layers and the last one is copied for every other layer
(docs/ARCHITECTURE.md, "The three deployment forms"):

* layer ``d-1`` (the template) and layer ``d-2`` are compared node by node
  (same ops, attributes, wiring); layer 0 may differ, because the optimizer
  computes values that every layer shares (rotary tables, shapes) once, where
  layer 0 first needs them;
* every value the template reads from outside is classified by comparing it
  with what layer ``d-2`` reads at the same place: the same value (shared by
  all layers), a value of the previous layer (the residual stream), or a
  graph input / weight whose name differs only by the layer index (past keys
  and values, LoRA inputs, the layer's weights): each copy reads the next
  layer's, and the weights are the model's own tensors of that layer;
* what came after the template (final norm, LM head) reads the last copy.

Anything that does not fit raises :class:`NotStampable` with the reason, and the
caller traces every layer. The stamped graph is checked against PyTorch like
any trace (the export verifies every form); a model whose layers differ in ways
the trace of three cannot show (layer-index-dependent code) fails that check,
and the export traces again without stamping.

Only decoders whose layers are uniform are stamped: one ``nn.ModuleList`` of
same-class layers, one attention type, and the same LoRA slots (module and
kind) in every layer. LoRA ranks and scales may differ per layer
(``rank_pattern``, ``alpha_pattern``): in the hot-swap graph a rank is a dynamic
input axis and the scale is folded into the B input, so they do not change the
graph.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import dataclasses
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator

if TYPE_CHECKING:
    import numpy as np
    import onnx
    from torch import nn

    from lora_edge.export.exporter import ExportContext, GraphIO

# Layers traced: layer 0 (may hold values every layer shares), and two layers to compare, the last the template.
STAMP_DEPTH = 3
SCOPES_KEY = "pkg.torch.onnx.name_scopes"
NAMESPACE_KEY = "namespace"


class NotStampable(Exception):
    """The model or its trace does not allow layer stamping; the message says why (the caller traces every layer).

    ``notable`` is False where tracing every layer is simply the plan (too few
    layers to gain anything): nothing worth a progress line.
    """

    def __init__(self, reason: str, notable: bool = True):
        super().__init__(reason)
        self.notable = notable


@dataclass(frozen=True)
class LayerStack:
    """Where a decoder's layers are: the ``nn.ModuleList`` path in the model and the layer count."""

    path: str  # e.g. "model.layers" (relative to the model the slots name)
    count: int

    def layer_of(self, module: str) -> int | None:
        """The layer index of a module path inside the stack, None for modules outside it."""
        prefix = f"{self.path}."
        if not module.startswith(prefix):
            return None
        return int(module[len(prefix):].split(".", 1)[0])


def _text_config(config):
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def layer_stack(model: "nn.Module", config, slots: list) -> LayerStack:
    """The model's layer stack when its layers can be stamped; raises NotStampable with the reason otherwise."""
    from torch import nn

    text = _text_config(config)
    count = int(getattr(text, "num_hidden_layers", 0) or 0)
    if count <= STAMP_DEPTH:
        raise NotStampable(f"{count} layers: no more than the {STAMP_DEPTH} a stamped trace traces anyway",
                           notable=False)
    stacks = [(name, module) for name, module in model.named_modules()
              if isinstance(module, nn.ModuleList) and len(module) == count]
    if len(stacks) != 1:
        raise NotStampable(f"{len(stacks)} module lists of {count} layers in the model, not one")
    path, layers = stacks[0]
    if len({type(layer) for layer in layers}) != 1:
        raise NotStampable("the layers are not all of one class")
    if len(set(getattr(text, "layer_types", None) or [None])) != 1:
        raise NotStampable("the layers are of several attention types (layer_types)")
    stack = LayerStack(path, count)
    per_layer: list[set] = [set() for _ in range(count)]
    for slot in slots:
        index = stack.layer_of(slot.module)
        if index is None:
            continue
        if slot.rank_axis is None:  # a head tensor, not a LoRA factor
            raise NotStampable(f"'{slot.module}' is saved whole inside a layer (modules_to_save)")
        relative = slot.module[len(f"{path}.{index}."):]
        per_layer[index].add((relative, slot.kind))
    for index, targets in enumerate(per_layer):
        if targets != per_layer[0]:
            raise NotStampable(f"layer {index}'s LoRA targets differ from layer 0's (e.g. layers_to_transform)")
    return stack


@contextlib.contextmanager
def shallow_twin(model: "nn.Module", stack: LayerStack, context: "ExportContext",
                 depth: int = STAMP_DEPTH) -> Iterator["ExportContext"]:
    """While open, ``model`` runs only its first ``depth`` layers; yields the export context of that twin.

    The model's layer list is swapped for a shorter one holding the same layer
    modules (no weight is copied) and put back on exit; the context gets a copy
    of the config with ``depth`` layers (the graph I/O's past and present).
    """
    from torch import nn

    parent_path, _, attribute = stack.path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    full = getattr(parent, attribute)
    config = copy.deepcopy(context.config)
    text = _text_config(config)
    text.num_hidden_layers = depth
    if getattr(text, "layer_types", None):
        text.layer_types = list(text.layer_types)[:depth]
    setattr(parent, attribute, nn.ModuleList(list(full)[:depth]))
    try:
        yield dataclasses.replace(context, config=config)
    finally:
        setattr(parent, attribute, full)


def trace_stamped(model: "nn.Module", slots: list, context: "ExportContext", full_io: "GraphIO",
                  graph_io: Callable[[list, "ExportContext"], "GraphIO"], opset: int | None,
                  graph_name: str) -> tuple["onnx.ModelProto", dict[str, "np.ndarray"]]:
    """The hot-swap trace of ``model`` (as :func:`~lora_edge.export.exporter.trace_in_memory` returns it), stamped.

    ``full_io`` is the hot-swap GraphIO of the whole model: the stamped graph gets
    its inputs and outputs, and the stamped layers' weights are its module's
    tensors. ``graph_io(slots, context)`` makes the hot-swap GraphIO of ``model``
    for the shallow twin (``lora_edge.export.hotswap.hotswap_graph_io``). Raises
    NotStampable when the model or the shallow trace does not fit.
    """
    from lora_edge.core.errors import ExportError
    from lora_edge.export.exporter import trace_in_memory

    stack = layer_stack(model, context.config, slots)
    shallow_slots = [slot for slot in slots if (stack.layer_of(slot.module) or 0) < STAMP_DEPTH]
    try:
        with shallow_twin(model, stack, context) as twin_context:
            io = graph_io(shallow_slots, twin_context)
            traced, weights = trace_in_memory(_static_ranks(io, shallow_slots), opset, graph_name)
            if not name_rank_dims(traced, shallow_slots):  # a rank reaches an op this cannot follow
                traced, weights = trace_in_memory(io, opset, graph_name)
    except ExportError as exc:  # the whole model may still trace: let the caller try
        raise NotStampable(f"the {STAMP_DEPTH}-layer twin does not trace ({exc.what})") from exc
    try:
        return _stamp(model, slots, full_io, stack, io, shallow_slots, traced, weights)
    except NotStampable:
        raise
    except Exception as exc:  # a graph the stamper did not foresee (a dtype numpy lacks, ...): trace every layer
        raise NotStampable(f"{type(exc).__name__} while stamping: {exc}") from exc


def _static_ranks(io: "GraphIO", slots: list) -> "GraphIO":
    """``io`` with the LoRA rank axes static (the example's rank), for the twin's trace.

    Why: every dynamic axis is a symbol torch.export and the decompositions
    reason about for each op that touches it; the twin of SmolLM2-135M has 21
    rank axes, and with static ranks torch.export + the decompositions take
    ~1.5 of ~7 CPU s less (84 fewer traced nodes, all shape checks). The graph's nodes are
    the same (a rank is only ever contracted by a MatMul): only the types of
    the LoRA inputs and of the values they reach hold the static size, which
    :func:`name_rank_dims` names again.
    """
    ranks = {slot.name for slot in slots if slot.rank_axis is not None}
    axes = {name: dims for name, dims in io.dynamic_axes.items() if name not in ranks}
    return dataclasses.replace(io, dynamic_axes=axes)


def name_rank_dims(model: "onnx.ModelProto", slots: list) -> bool:
    """Name the rank axes of a trace made with static ranks (:func:`_static_ranks`) as a dynamic trace does, in place.

    The LoRA inputs get their slots' dim names; a value made from them gets the
    name on the axis that carries the rank: a Transpose moves it, a MatMul
    whose second input carries it on its last axis puts it on the output's
    last axis, a MatMul that contracts it drops it. Returns False (the model
    then only partly renamed: trace again with dynamic ranks) when a rank
    reaches any other op, or an axis that is not the static rank's size.
    """
    graph = model.graph
    typed = {value.name: value for value in list(graph.input) + list(graph.value_info)}
    carried: dict[str, dict[int, str]] = {}  # value -> {axis: rank dim name}
    sizes: dict[str, int] = {}  # rank dim name -> the static size it was traced with
    for slot in slots:
        if slot.rank_axis is not None and slot.name in typed:
            carried[slot.name] = dict(slot.dynamic)
            dims = typed[slot.name].type.tensor_type.shape.dim
            sizes.update((name, dims[axis].dim_value) for axis, name in slot.dynamic if axis < len(dims))
    for name, axes in list(carried.items()):
        if not _rename_axes(typed[name], axes, sizes):
            return False
    for node in graph.node:
        reads = [(index, carried[name]) for index, name in enumerate(node.input) if name in carried]
        if not reads:
            continue
        axes = _rank_axes_after(node, reads, typed)
        if axes is None or len(node.output) != 1:
            return False
        if axes:
            carried[node.output[0]] = axes
            value = typed.get(node.output[0])
            if value is not None and not _rename_axes(value, axes, sizes):
                return False
    return True


def _rank_axes_after(node, reads: list[tuple[int, dict[int, str]]], typed: dict) -> dict[int, str] | None:
    """{axis: dim name} of the ranks ``node``'s output carries, given the inputs that carry some; None: unknown op."""
    if node.op_type == "Transpose" and len(reads) == 1:
        perm = next((list(attr.ints) for attr in node.attribute if attr.name == "perm"), None)
        (_, axes), = reads
        if perm is None:
            return None
        return {perm.index(axis): name for axis, name in axes.items()}
    if node.op_type == "MatMul":
        carried = {}
        for index, axes in reads:
            value = typed.get(node.input[index])
            rank = len(value.type.tensor_type.shape.dim) if value is not None else 0
            for axis, name in axes.items():
                if rank >= 2 and (index, axis) in ((0, rank - 1), (1, rank - 2)):  # contracted
                    continue
                output = typed.get(node.output[0])
                if rank < 2 or (index, axis) != (1, rank - 1) or output is None:
                    return None
                carried[len(output.type.tensor_type.shape.dim) - 1] = name
        return carried
    return None


def _rename_axes(value, axes: dict[int, str], sizes: dict[str, int]) -> bool:
    """Name ``value``'s static rank axes; False when such an axis is missing or not of the size the rank was traced with."""
    dims = value.type.tensor_type.shape.dim
    for axis, name in axes.items():
        if axis >= len(dims) or not sizes.get(name) or dims[axis].dim_value != sizes[name]:
            return False
        dims[axis].dim_param = name
    return True


def _stamp(model, slots: list, full_io: "GraphIO", stack: LayerStack, io: "GraphIO", shallow_slots: list,
           traced, weights: dict) -> tuple["onnx.ModelProto", dict[str, "np.ndarray"]]:
    """Stamp the shallow twin's trace (``io``, ``traced``, ``weights``) into the whole model's graph, in place."""
    module_path = next((name for name, module in full_io.module.named_modules()
                        if module is model.get_submodule(stack.path)), None)
    if module_path is None:
        raise NotStampable("the layer list is not inside the traced module")
    layer_names = {name: int(numbers[0]) for name in io.input_names
                   if len(numbers := [token for token in name.split(".") if token.isdigit()]) == 1}
    layer_names.update({slot.name: stack.layer_of(slot.module) for slot in shallow_slots})
    swapped = [model.get_parameter(slot.parameter) for slot in slots]  # fed as graph inputs, not initializers
    stamper = _Stamper(traced, weights, module_path, stack.count, layer_names, full_io, slots, swapped)
    stamper.run()
    return traced, weights


def _tokens_index(first: str, second: str, first_layer: int, second_layer: int) -> int | None:
    """The position of the one dot-separated token in which two names differ as ``first_layer`` -> ``second_layer``."""
    a, b = first.split("."), second.split(".")
    if len(a) != len(b):
        return None
    differing = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
    if len(differing) == 1 and a[differing[0]] == str(first_layer) and b[differing[0]] == str(second_layer):
        return differing[0]
    return None


def _for_layer(name: str, position: int, layer: int) -> str:
    tokens = name.split(".")
    tokens[position] = str(layer)
    return ".".join(tokens)


class _Stamper:
    """The graph surgery of :func:`trace_stamped` on one traced ModelProto (in place)."""

    def __init__(self, traced, weights, module_path: str, count: int, layer_names: dict[str, int],
                 full_io: "GraphIO", slots: list, swapped: list):
        self.model, self.graph, self.weights, self.swapped = traced, traced.graph, weights, swapped
        self.module_path, self.count, self.full_io = module_path, count, full_io
        self.slots = {slot.name: slot for slot in slots}
        self.template, self.previous = STAMP_DEPTH - 1, STAMP_DEPTH - 2
        self.nodes = list(self.graph.node)  # one wrapper per node: the maps below key nodes by id()
        self.initializers = {init.name: init for init in self.graph.initializer}
        self.inputs = {value.name: value for value in self.graph.input}
        self.layer_names = dict(layer_names)
        scope = re.compile(rf"^{re.escape(module_path)}\.(\d+)\.")
        for name in self.initializers:
            match = scope.match(name)
            if match:
                self.layer_names[name] = int(match.group(1))
        self.scope = re.compile(rf"^{re.escape(module_path)}\.(\d+)$")

    # --- regions -------------------------------------------------------------------------------------

    def _scoped_layer(self, node) -> int | None:
        """The layer whose module scope the node was traced in (its name-scope metadata), None outside layers.

        Nodes that onnxscript's rewrites create have no metadata: None, see :meth:`_adopted_layer`.
        """
        props = {prop.key: prop.value for prop in node.metadata_props}
        layers = {int(m.group(1)) for scope in ast.literal_eval(props.get(SCOPES_KEY, "[]"))
                  if (m := self.scope.match(scope))}
        return layers.pop() if len(layers) == 1 else None

    def _adopted_layer(self, node, readers: list, layer_of: dict) -> int | None:
        """The layer of a node outside every layer's scope that belongs to one layer all the same.

        The exporter hoists the Transposes of a layer's LoRA inputs out of the
        layer; a rewrite's new nodes (GPT-2's Split of the fused QKV) carry no
        scope. Such a node reads tensors of one layer (named for it or made by its
        nodes) besides shared constants, and only nodes of that layer read it. A
        Shape of a past input that stands for the batch size is read elsewhere,
        and stays shared.
        """
        layers = set()
        for name in node.input:
            if not name:
                continue
            if name in layer_of:
                layers.add(layer_of[name])
            elif name in self.layer_names:
                layers.add(self.layer_names[name])
            elif name not in self.initializers:
                return None  # a shared computed value or graph input
        if len(layers) != 1:
            return None
        layer = layers.pop()
        return layer if readers and all(self.scoped.get(id(reader)) == layer for reader in readers) else None

    def _regions(self) -> dict[int, list]:
        """Layer -> its nodes in graph order (scoped by the trace, or adopted: :meth:`_adopted_layer`)."""
        self.scoped = {id(node): self._scoped_layer(node) for node in self.nodes}
        readers: dict[str, list] = {}
        for node in self.nodes:
            for name in node.input:
                readers.setdefault(name, []).append(node)
        regions: dict[int, list] = {}
        layer_of: dict[str, int] = {}  # value -> the layer of the node that makes it
        for node in self.nodes:
            layer = self.scoped[id(node)]
            if layer is None:
                layer = self._adopted_layer(node, [r for out in node.output for r in readers.get(out, [])], layer_of)
            if layer is not None:
                regions.setdefault(layer, []).append(node)
                layer_of.update((out, layer) for out in node.output)
        if sorted(regions) != list(range(STAMP_DEPTH)):
            raise NotStampable(f"the shallow trace has nodes of layers {sorted(regions)}")
        self.layer_of = layer_of
        return regions

    # --- classification --------------------------------------------------------------------------------

    def run(self) -> None:
        regions = self._regions()
        template, previous = regions[self.template], regions[self.previous]
        if len(template) != len(previous):
            raise NotStampable(f"layers {self.previous} and {self.template} trace to {len(previous)} and "
                               f"{len(template)} nodes")
        produced_by = {}  # value -> (layer, node index, output index)
        for layer in (self.previous, self.template):
            for index, node in enumerate(regions[layer]):
                for position, output in enumerate(node.output):
                    produced_by[output] = (layer, index, position)
        self.outputs = self._classify_outputs(previous, template)
        plans = [self._classify_inputs(a, b, produced_by, template) for a, b in zip(previous, template)]
        self._check_consumers(regions, produced_by)
        self.per_layer_tensors = {name: position for plan in plans for kind, name, position in plan
                                  if kind == "indexed"}
        self._check_weights()
        copies = [self._copy(template, plans, layer) for layer in range(STAMP_DEPTH, self.count)]
        self._rewire_after(template)
        nodes = self.nodes
        members = {id(node) for node in template}
        last = max(index for index, node in enumerate(nodes) if id(node) in members)
        stamped = nodes[:last + 1] + [node for copy_ in copies for node in copy_] + nodes[last + 1:]
        ordered = [_clone(node) for node in _topological(stamped)]  # detached before the field is cleared
        del self.graph.node[:]
        self.graph.node.extend(ordered)
        self._add_tensors()
        self._io()

    def _classify_outputs(self, previous: list, template: list) -> dict[str, int | None]:
        """Template value -> the token position of its layer index (present.2.key), or None (renamed per copy)."""
        outputs = {}
        for a, b in zip(previous, template):
            if len(a.output) != len(b.output):
                raise NotStampable(f"node {b.name} differs from its twin {a.name} in the previous layer")
            for x, y in zip(a.output, b.output):
                outputs[y] = _tokens_index(x, y, self.previous, self.template)
        return outputs

    def _classify_inputs(self, a, b, produced_by: dict, template: list) -> list[tuple]:
        """How each input of the template node ``b`` is found in a copy, from what its twin ``a`` reads."""
        if (a.op_type, a.domain, len(a.input)) != (b.op_type, b.domain, len(b.input)) or \
                [x.SerializeToString() for x in a.attribute] != [y.SerializeToString() for y in b.attribute]:
            raise NotStampable(f"node {b.name} ({b.op_type}) of layer {self.template} differs from its twin "
                               f"{a.name} ({a.op_type}) in layer {self.previous}")
        plan = []
        for x, y in zip(a.input, b.input):
            source = produced_by.get(y)
            if x == y:
                plan.append(("shared", y, None))
            elif source is not None and source[0] == self.template:
                if produced_by.get(x) != (self.previous, *source[1:]):
                    raise NotStampable(f"node {b.name} reads {y}, its twin {a.name} reads {x}")
                plan.append(("internal", y, None))
            elif source is not None and source[0] == self.previous:
                # the residual stream: in a copy, the previous copy's version of the template's value
                if self.layer_of.get(x) != self.previous - 1:
                    raise NotStampable(f"node {b.name} reads {y} of layer {self.previous}, its twin {a.name} "
                                       f"reads {x}, not a value of layer {self.previous - 1}")
                plan.append(("link", template[source[1]].output[source[2]], None))
            elif (position := _tokens_index(x, y, self.previous, self.template)) is not None and \
                    (y in self.inputs or y in self.initializers):
                plan.append(("indexed", y, position))
            elif self._same_constant(x, y):
                plan.append(("shared", y, None))
            else:
                raise NotStampable(f"node {b.name} reads {y} where its twin in layer {self.previous} reads {x}")
        return plan

    def _check_consumers(self, regions: dict, produced_by: dict) -> None:
        """Values of layer d-2 go only to the template or graph outputs; named graph outputs are per-layer."""
        members = {id(node) for layer in (self.previous, self.template) for node in regions[layer]}
        for node in self.nodes:
            if id(node) in members:
                continue
            for name in node.input:
                if produced_by.get(name, (None,))[0] == self.previous:
                    raise NotStampable(f"{node.name}, outside layer {self.template}, reads layer {self.previous}'s {name}")
        for node in regions[self.previous]:
            for name in node.input:
                if produced_by.get(name, (None,))[0] == self.template:
                    raise NotStampable(f"layer {self.previous} reads {name} of layer {self.template}")
        for value in self.graph.output:
            source = produced_by.get(value.name)
            if source is not None and self.outputs.get(value.name) is None and source[0] == self.template:
                raise NotStampable(f"graph output {value.name} of the template layer has no layer index")

    def _check_weights(self) -> None:
        """Every per-layer initializer the template reads is the module's tensor of that name, unchanged."""
        import numpy as np
        from onnx import numpy_helper

        parameters = dict(self.full_io.module.named_parameters(remove_duplicate=False))
        tensors = {**parameters, **dict(self.full_io.module.named_buffers(remove_duplicate=False))}
        self.tensors = tensors
        swapped = {id(tensor) for tensor in self.swapped}
        prefix = f"{self.module_path}.{self.template}."
        for name, parameter in parameters.items():  # a weight the optimizer folded away would be lost for the copies
            if name.startswith(prefix) and id(parameter) not in swapped and name not in self.per_layer_tensors:
                raise NotStampable(f"the trace has no initializer {name} (folded into a constant, e.g. all ones)")
        for name in self.per_layer_tensors:
            if name not in self.initializers:
                continue
            tensor = tensors.get(name)
            if tensor is None:
                raise NotStampable(f"initializer {name} is no tensor of the model")
            values = tensor.detach().numpy()
            if name in self.weights:
                same = np.shares_memory(self.weights[name], values) or np.array_equal(self.weights[name], values)
            else:
                same = np.array_equal(numpy_helper.to_array(self.initializers[name]), values)
            if not same:
                raise NotStampable(f"initializer {name} is not the model's tensor as it is (folded by the optimizer)")

    def _same_constant(self, first: str, second: str) -> bool:
        """True for two initializers with data holding the same values (the optimizer keeps equal constants apart)."""
        import numpy as np
        from onnx import numpy_helper

        if first not in self.initializers or second not in self.initializers or \
                first in self.weights or second in self.weights:
            return False
        a, b = self.initializers[first], self.initializers[second]
        if a.data_type != b.data_type or list(a.dims) != list(b.dims):
            return False
        return bool(np.array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b)))

    # --- copies --------------------------------------------------------------------------------------

    def _value(self, name: str, layer: int) -> str:
        """The name of template value ``name`` in the copy for ``layer``."""
        if layer == self.template:
            return name
        position = self.outputs.get(name)
        return _for_layer(name, position, layer) if position is not None else f"{name}_layer{layer}"

    def _copy(self, template: list, plans: list, layer: int) -> list:
        import onnx

        old_scope = f"{self.module_path}.{self.template}"
        scope = re.compile(rf"{re.escape(old_scope)}(?![0-9])")
        nodes = []
        for node, plan in zip(template, plans):
            new = onnx.NodeProto()
            new.CopyFrom(node)
            new.name = f"{node.name}_layer{layer}"
            for i, (kind, name, position) in enumerate(plan):
                if kind == "internal":
                    new.input[i] = self._value(name, layer)
                elif kind == "link":
                    new.input[i] = self._value(name, layer - 1)
                elif kind == "indexed":
                    new.input[i] = _for_layer(name, position, layer)
            for i, name in enumerate(node.output):
                new.output[i] = self._value(name, layer)
            for prop in new.metadata_props:
                if prop.key in (SCOPES_KEY, NAMESPACE_KEY):
                    prop.value = scope.sub(f"{self.module_path}.{layer}", prop.value)
            nodes.append(new)
        names = {out for node in nodes for out in node.output}
        clash = names & ({out for node in self.nodes for out in node.output} | set(self.inputs) |
                         set(self.initializers))
        if clash:
            raise NotStampable(f"a stamped value's name is taken: {sorted(clash)[0]}")
        self._copy_value_info(template, layer)
        return nodes

    def _copy_value_info(self, template: list, layer: int) -> None:
        dims = self._rank_dims(layer)
        produced = {out for node in template for out in node.output}
        for value in list(self.graph.value_info):
            if value.name in produced:
                new = self.graph.value_info.add()
                new.CopyFrom(value)
                new.name = self._value(value.name, layer)
                for dim in new.type.tensor_type.shape.dim:
                    if dim.dim_param in dims:
                        dim.dim_param = dims[dim.dim_param]

    def _rank_dims(self, layer: int) -> dict[str, str]:
        """Template dim name -> the dim name of the same slot axis in ``layer`` (each LoRA pair has its rank axis)."""
        dims = {}
        for name, position in self.per_layer_tensors.items():
            if name in self.slots and name in self.inputs:
                slot = self.slots[_for_layer(name, position, layer)]
                shape = self.inputs[name].type.tensor_type.shape.dim
                for axis, dim_name in slot.dynamic:
                    if shape[axis].dim_param:
                        dims[shape[axis].dim_param] = dim_name
        return dims

    def _rewire_after(self, template: list) -> None:
        """Nodes outside the layers that read the template's values read the last copy's."""
        members = {id(node) for node in template}
        produced = {out for node in template for out in node.output}
        for node in self.nodes:
            if id(node) in members:
                continue
            for i, name in enumerate(node.input):
                if name in produced:
                    node.input[i] = self._value(name, self.count - 1)

    # --- tensors and I/O ------------------------------------------------------------------------------

    def _add_tensors(self) -> None:
        """Each stamped layer's initializers: stubs over the model's tensors for large ones, data for small ones."""
        import onnx
        from onnx import numpy_helper

        for name, position in self.per_layer_tensors.items():
            if name not in self.initializers:
                continue
            template = self.initializers[name]
            for layer in range(STAMP_DEPTH, self.count):
                target = _for_layer(name, position, layer)
                tensor = self.tensors.get(target)
                if tensor is None or tuple(tensor.shape) != tuple(template.dims):
                    raise NotStampable(f"layer {layer} has no tensor {target} shaped like {name}")
                values = tensor.detach().numpy()
                if name in self.weights:
                    if values.dtype != self.weights[name].dtype:
                        raise NotStampable(f"{target} is {values.dtype}, {name} {self.weights[name].dtype}")
                    self.weights[target] = values
                    self.graph.initializer.append(onnx.TensorProto(name=target, data_type=template.data_type,
                                                                   dims=list(template.dims)))
                else:
                    stamped = numpy_helper.from_array(values.copy(), target)
                    if stamped.data_type != template.data_type:
                        raise NotStampable(f"{target} is {values.dtype}, unlike {name}")
                    self.graph.initializer.append(stamped)

    def _io(self) -> None:
        """Graph inputs and outputs in the whole model's order, the stamped layers' made from the template's."""
        inputs, outputs = dict(self.inputs), {value.name: value for value in self.graph.output}
        for name, position in self.per_layer_tensors.items():
            if name in self.inputs:
                for layer in range(STAMP_DEPTH, self.count):
                    inputs[_for_layer(name, position, layer)] = _renamed(self.inputs[name],
                                                                         _for_layer(name, position, layer))
        for name, position in self.outputs.items():
            if position is not None and name in outputs:
                for layer in range(STAMP_DEPTH, self.count):
                    outputs[_for_layer(name, position, layer)] = _renamed(outputs[name], _for_layer(name, position, layer))
        for what, have, want in (("inputs", inputs, self.full_io.input_names),
                                 ("outputs", outputs, self.full_io.output_names)):
            if set(have) != set(want):
                missing = sorted(set(want) - set(have)) or sorted(set(have) - set(want))
                raise NotStampable(f"the stamped graph's {what} differ from the whole model's ({missing[0]})")
        for name in self.full_io.input_names:  # each LoRA pair's own rank axis, named as a whole trace names it
            slot = self.slots.get(name)
            for axis, dim_name in (slot.dynamic if slot else ()):
                inputs[name].type.tensor_type.shape.dim[axis].dim_param = dim_name
        del self.graph.input[:]
        self.graph.input.extend(inputs[name] for name in self.full_io.input_names)
        del self.graph.output[:]
        self.graph.output.extend(outputs[name] for name in self.full_io.output_names)


def _clone(node):
    import onnx

    new = onnx.NodeProto()
    new.CopyFrom(node)
    return new


def _renamed(value, name: str):
    import onnx

    new = onnx.ValueInfoProto()
    new.CopyFrom(value)
    new.name = name
    return new


def _topological(nodes: list) -> list:
    """``nodes`` in an order where every value is produced before it is read, keeping the given order otherwise."""
    import heapq

    producer = {out: index for index, node in enumerate(nodes) for out in node.output if out}
    waiting = [0] * len(nodes)
    readers: dict[int, list[int]] = {}
    for index, node in enumerate(nodes):
        sources = {producer[name] for name in node.input if name in producer and producer[name] != index}
        waiting[index] = len(sources)
        for source in sources:
            readers.setdefault(source, []).append(index)
    ready = [index for index, count in enumerate(waiting) if count == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        index = heapq.heappop(ready)
        order.append(nodes[index])
        for reader in readers.get(index, []):
            waiting[reader] -= 1
            if waiting[reader] == 0:
                heapq.heappush(ready, reader)
    if len(order) != len(nodes):
        raise NotStampable("the stamped graph has a cycle")
    return order

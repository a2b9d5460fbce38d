"""Which linear layers of a graph are LoRA pairs (kept float) and which are base weights (quantized).

Conventions the exporter guarantees (docs/ARCHITECTURE.md, "The three deployment forms"): in branched graphs every LoRA
weight initializer's name contains ``lora_A`` or ``lora_B``; in hot-swap graphs
LoRA weights (and ``modules_to_save`` heads) are graph inputs. A linear layer is
a ``MatMul``/``Gemm`` whose second operand is a weight: :func:`linear_roles`
sorts them before quantization, :func:`inventory` reads a quantized graph back
so tests (and users, through the manifest) can see what was quantized.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from lora_edge.core.onnx_spec import GraphIndex

if TYPE_CHECKING:
    import onnx

LORA_MARKERS = ("lora_A", "lora_B")
FLOAT_LINEAR_OPS = ("MatMul", "Gemm")
# Quantized linear ops and the input index of their weight.
QUANTIZED_LINEAR_OPS = {"MatMulInteger": 1, "DynamicQuantizeMatMul": 1, "MatMulIntegerToFloat": 1,
                        "QLinearMatMul": 3, "MatMulNBits": 1, "QGemm": 3}
# Ops a weight may pass through on its way to a MatMul (hot-swap inputs are transposed in the graph).
WEIGHT_PATH_OPS = ("Transpose", "Cast", "Reshape", "Identity")


def is_lora_name(name: str) -> bool:
    """True for tensors named after a LoRA factor (PEFT keys and branched initializers)."""
    return any(marker in name for marker in LORA_MARKERS)


def weight_source(index: GraphIndex, name: str) -> str:
    """Follow a MatMul operand up through Transpose/Cast/Reshape/Identity to the tensor it comes from."""
    while True:
        node = index.producer.get(name)
        if node is None or node.op_type not in WEIGHT_PATH_OPS:
            return name
        name = node.input[0]


@dataclass
class LinearRoles:
    """Node names of a float graph's linear layers, by what quantization does with them."""

    lora: list[str] = field(default_factory=list)       # low-rank LoRA MatMuls: stay float
    swappable: list[str] = field(default_factory=list)  # weights fed at run time (hot-swap heads): stay float
    base: list[str] = field(default_factory=list)       # constant base weights: quantized

    @property
    def keep_float(self) -> list[str]:
        """Nodes every quantizer must leave alone."""
        return self.lora + self.swappable


def linear_roles(model: "onnx.ModelProto") -> LinearRoles:
    """Sort the MatMul/Gemm nodes of a float graph into LoRA, run-time-fed and base linears.

    Products of two activations (attention scores) are not linear layers and are left out.
    """
    index = GraphIndex(model)
    roles = LinearRoles()
    for node in model.graph.node:
        if node.op_type not in FLOAT_LINEAR_OPS or len(node.input) < 2:
            continue
        source = weight_source(index, node.input[1])
        if is_lora_name(source):
            roles.lora.append(node.name)
        elif source in index.graph_inputs:
            roles.swappable.append(node.name)
        elif index.is_constant(source):
            roles.base.append(node.name)
    return roles


@dataclass
class LinearInventory:
    """What a (quantized) graph holds: quantized linears and the float ones, by role.

    Each entry is ``"<node name> <- <weight tensor>"``.
    """

    quantized: list[str] = field(default_factory=list)
    float_lora: list[str] = field(default_factory=list)
    float_base: list[str] = field(default_factory=list)
    swappable: list[str] = field(default_factory=list)

    def quantized_lora(self) -> list[str]:
        """Quantized linears whose weight is a LoRA factor (must be empty)."""
        return [entry for entry in self.quantized if is_lora_name(entry.split(" <- ")[1])]

    def to_json(self) -> dict:
        """Counts for the manifest (the lists are long)."""
        return {key: len(value) for key, value in asdict(self).items()}


def _is_integer_tensor(index: GraphIndex, name: str) -> bool:
    from onnx import TensorProto

    integer = {TensorProto.INT8, TensorProto.UINT8, TensorProto.INT4, TensorProto.UINT4}
    init = index.initializers.get(name)
    return init is not None and init.data_type in integer


def inventory(model: "onnx.ModelProto") -> LinearInventory:
    """Read back which linear layers of ``model`` are quantized and which stayed float.

    A float MatMul whose weight comes from DequantizeLinear of an integer
    initializer (QDQ format) counts as quantized.
    """
    index = GraphIndex(model)
    found = LinearInventory()
    for node in model.graph.node:
        if node.op_type in QUANTIZED_LINEAR_OPS:
            weight = node.input[QUANTIZED_LINEAR_OPS[node.op_type]]
            found.quantized.append(f"{node.name} <- {weight_source(index, weight)}")
            continue
        if node.op_type not in FLOAT_LINEAR_OPS or len(node.input) < 2:
            continue
        source = weight_source(index, node.input[1])
        producer = index.producer.get(source)
        if producer is not None and producer.op_type == "DequantizeLinear" and \
                _is_integer_tensor(index, producer.input[0]):
            found.quantized.append(f"{node.name} <- {producer.input[0]}")
        elif is_lora_name(source):
            found.float_lora.append(f"{node.name} <- {source}")
        elif source in index.graph_inputs:
            found.swappable.append(f"{node.name} <- {source}")
        elif index.is_constant(source):
            found.float_base.append(f"{node.name} <- {source}")
    return found

"""The quantizers, one per precision, in a registry: fp16, int8 dynamic, int8 static (QDQ), int4 (MatMulNBits).

Every quantizer takes a :class:`QuantizeJob` (a float graph already fused for its
target, the nodes to keep float, the options) and writes ``job.target``. They
all leave the LoRA MatMuls and the run-time-fed weights of hot-swap graphs
alone (``job.roles.keep_float``), so a quantized base keeps its adapter exactly.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from lora_edge.core.choices import Precision
from lora_edge.quantize.lora import LinearRoles

if TYPE_CHECKING:
    import numpy as np
    import onnx

    from lora_edge.core.recipe import QuantizeOptions
    from lora_edge.quantize.decoder import TiedEmbedding

# Ops kept in fp32 inside fp16 graphs: their intermediate values overflow fp16's
# 65504 range (squares and sums of a hidden state, exponentials), plus ORT's default list.
FP16_FLOAT_OPS = ["Pow", "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL2", "Exp", "Log", "Sqrt",
                  "Reciprocal", "CumSum", "Range"]
# The onnxruntime.quantization loggers print one INFO line per node.
QUANTIZATION_LOGGERS = ("onnxruntime.quantization", "onnxruntime.quantization.matmul_nbits_quantizer", "root")
# Static quantization touches only the linear layers: int8 LayerNorm/Softmax/residuals cost accuracy
# and, as Q/DQ pairs around every op, time (docs/ARCHITECTURE.md, "Facts": QDQ on everything measured 1.4-4.5x slower).
STATIC_OP_TYPES = ["MatMul", "Gemm", "Gather"]


@dataclass
class QuantizeJob:
    """One graph to quantize: the fused float model, where to write it, what stays float, the options.

    The job owns ``model``: quantizers change it in place and may release it,
    so the caller keeps no other reference to it. An int4
    job's model may keep large weights in the source file
    (:func:`lora_edge.core.onnx_io.load_by_reference`): it reads them from there.
    """

    model: "onnx.ModelProto | None"
    target: Path
    roles: LinearRoles
    options: "QuantizeOptions"
    calibration: Callable[[], list[dict[str, "np.ndarray"]]] | None = None
    tied: "TiedEmbedding | None" = None  # a tied embedding and LM head: int4 stores them once


@contextlib.contextmanager
def quiet_quantizers() -> Iterator[None]:
    """Silence onnxruntime.quantization's per-node INFO logging and its pre-processing advice.

    The calibration sessions ORT creates itself would also log one "Initializer ... appears in
    graph inputs" warning per hot-swap input (expected, docs/ARCHITECTURE.md, "Facts"): ORT's default logger is
    raised to errors meanwhile, then set back to its default (warnings).
    """
    import onnxruntime

    loggers = [logging.getLogger(name) for name in QUANTIZATION_LOGGERS]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.ERROR)
    onnxruntime.set_default_logger_severity(3)
    try:
        yield
    finally:
        onnxruntime.set_default_logger_severity(2)
        for log, level in zip(loggers, levels):
            log.setLevel(level)


def _common_extra_options() -> dict:
    from onnx import TensorProto

    # Tensors made by contrib ops (MultiHeadAttention, BiasGelu) have no inferred type; without
    # this ORT's quantizer fails with "Unable to find data type for weight_name" (docs/ARCHITECTURE.md, "Facts").
    return {"DefaultTensorType": TensorProto.FLOAT, "MatMulConstBOnly": True}


def quantize_fp16(job: QuantizeJob) -> dict:
    """fp16 weights and activations; graph inputs/outputs and overflow-prone ops stay fp32.

    Hot-swap LoRA inputs keep their fp32 type (keep_io_types), so the same
    ``.onnx_adapter`` files feed the fp16 graph.
    """
    from onnxruntime.transformers import float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = OnnxModel(job.model)
    blocked = sorted(set(float16.DEFAULT_OP_BLOCK_LIST) | set(FP16_FLOAT_OPS))
    model.convert_float_to_float16(keep_io_types=True, op_block_list=blocked)
    model.save_model_to_file(str(job.target), use_external_data_format=False)
    return {"float_ops": FP16_FLOAT_OPS, "io": "fp32"}


@contextlib.contextmanager
def vectorized_per_channel() -> Iterator[None]:
    """ORT's per-channel int8 weight quantization, computed for all channels of a tensor at once meanwhile.

    ``onnxruntime.quantization`` quantizes a weight one output channel at a time in
    Python (21,125 calls for MiniLM-L6's 38 linears: 60% of ``quantize_dynamic``'s
    time). :func:`_per_channel_all_at_once` does the same float32/float64 arithmetic
    on whole tensors and writes the same initializers, byte for byte
    (tests/test_quantize.py compares the graphs); anything it does not cover
    (overrides, 4/16-bit types, a minimum range) goes to ORT's own loop.
    """
    from onnxruntime.quantization.onnx_quantizer import ONNXQuantizer

    original = ONNXQuantizer.quantize_weight_per_channel_impl

    def impl(self, weight_name, weight_qType, channel_axis, reduce_range=True, keep_float_weight=False):  # noqa: N803
        done = _per_channel_all_at_once(self, weight_name, weight_qType, channel_axis, reduce_range, keep_float_weight)
        return done or original(self, weight_name, weight_qType, channel_axis, reduce_range, keep_float_weight)

    ONNXQuantizer.quantize_weight_per_channel_impl = impl
    try:
        yield
    finally:
        ONNXQuantizer.quantize_weight_per_channel_impl = original


def _per_channel_all_at_once(quantizer, weight_name: str, weight_type: int, axis: int, reduce_range: bool,
                             keep_float_weight: bool) -> tuple[str, str, str] | None:
    """ORT's ``quantize_weight_per_channel_impl`` for 8-bit weights without overrides, on whole tensors; else None."""
    import numpy as np
    import onnx
    from onnx import TensorProto, numpy_helper
    from onnxruntime.quantization.quant_utils import find_by_name, get_qmin_qmax_for_qType

    initializer = find_by_name(weight_name, quantizer.model.initializer())
    rank = len(initializer.dims) if initializer is not None else 0
    if (weight_type not in (TensorProto.INT8, TensorProto.UINT8) or keep_float_weight or initializer is None
            or initializer.data_type != TensorProto.FLOAT or quantizer.min_real_range is not None
            or weight_name in quantizer.tensor_quant_overrides or not -rank <= axis < rank):
        return None
    axis %= rank
    weights = numpy_helper.to_array(initializer)
    rows = np.moveaxis(weights, axis, 0).reshape(weights.shape[axis], -1)
    if rows.shape[1] == 0:
        return None
    symmetric = quantizer.is_weight_symmetric(weight_type)
    qmin, qmax = get_qmin_qmax_for_qType(weight_type, quantizer.reduce_range and reduce_range, symmetric=symmetric)
    # compute_scale_zp, per channel: the range holds 0, symmetric about it for signed weights
    rmin = np.minimum(rows.min(axis=1), np.float32(0))
    rmax = np.maximum(rows.max(axis=1), np.float32(0))
    if symmetric:
        rmax = np.maximum(np.abs(rmin), np.abs(rmax))
        rmin = -rmax
    scale = (rmax.astype(np.float64) - rmin.astype(np.float64)) / (np.float64(qmax) - np.float64(qmin))
    if symmetric:
        zero_point = np.full(scale.shape, np.round((qmin + qmax) / np.float64(2.0)), dtype=qmin.dtype)
    else:
        with np.errstate(divide="ignore", invalid="ignore"):
            zero_point = np.round(qmin - rmin / scale).astype(qmin.dtype)
    degenerate = scale < np.finfo(np.float32).tiny
    scale = np.where(degenerate, np.float32(1.0), scale.astype(np.float32))
    zero_point = np.where(degenerate, np.zeros((), qmin.dtype), zero_point)
    # quantize_nparray, per channel: float32 division, round, shift, clip to the type's full range
    low, high = get_qmin_qmax_for_qType(weight_type, reduce_range=False, symmetric=False)
    quantized = (rows / scale[:, None]).round() + zero_point[:, None]
    np.clip(quantized, low, high, out=quantized)
    quantized = np.moveaxis(quantized.astype(qmin.dtype).reshape(np.moveaxis(weights, axis, 0).shape), 0, axis)
    names = (weight_name + "_quantized", weight_name + "_zero_point", weight_name + "_scale")
    shape = [initializer.dims[axis]]
    quantizer.model.initializer_extend([
        onnx.helper.make_tensor(names[2], initializer.data_type, shape, scale.tolist()),
        onnx.helper.make_tensor(names[1], weight_type, shape, zero_point.tolist())])
    quantizer.model.initializer_extend([numpy_helper.from_array(
        np.asarray(quantized, dtype=onnx.helper.tensor_dtype_to_np_dtype(weight_type)).reshape(initializer.dims),
        names[0])])
    return names


def quantize_int8_dynamic(job: QuantizeJob) -> dict:
    """int8 weights (symmetric), activations quantized per run (u8): ``quantize_dynamic``, in memory.

    ORT's own ``quantize_dynamic`` on the job's model, with its two shape-inference
    round trips through files done in memory on a weightless twin
    (:func:`shape_inference_in_memory`: the same graph, byte for byte).
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    per_channel = job.options.per_channel
    # quantize_dynamic first rewrites Gemm as a MatMul named "<gemm>_MatMul", and it quantizes
    # initializers even when they are graph inputs (hot-swap heads): exclude both names.
    # Its rewrite also copies a transposed weight into a constant, which would freeze a hot-swap
    # head: such Gemms become Transpose + MatMul here first.
    gemm_to_matmul(job.model, set(job.roles.swappable))
    excluded = job.roles.keep_float + [f"{name}_MatMul" for name in job.roles.keep_float]
    model, job.model = job.model, None  # quantized in place: no second copy of the weights
    with shape_inference_in_memory(), vectorized_per_channel(), per_tensor_in_place(), conformed_on_save():
        quantize_dynamic(model, job.target, per_channel=per_channel, weight_type=QuantType.QInt8,
                         nodes_to_exclude=excluded, extra_options=_common_extra_options())
    return {"weights": "s8", "activations": "u8 per run", "per_channel": per_channel}


@contextlib.contextmanager
def shape_inference_in_memory() -> Iterator[None]:
    """ORT's quantizers infer shapes in memory, on a weightless twin, instead of through files, meanwhile.

    ``quantize_dynamic`` given a model deep-copies it, saves it with external data,
    runs ``onnx.shape_inference.infer_shapes_path`` on that file (which writes
    another copy) and loads the result; ``ONNXQuantizer`` does it all again after
    its Gemm rewrite: three copies of the weights written to disk and read back per
    graph, most of the quantize stage's time on a busy disk. Shape inference reads
    no float weight, so :func:`_inferred_in_place` runs the same inference on the
    twin and copies the shapes into the model. A graph given as a file is untouched
    by this (its first inference already reads the file); the written graph is the
    one ORT's files give, byte for byte (tests/quantize/test_quantize.py).
    """
    import importlib

    onnx_quantizer = importlib.import_module("onnxruntime.quantization.onnx_quantizer")
    quantize = importlib.import_module("onnxruntime.quantization.quantize")  # the module, not its function
    originals = quantize.save_and_reload_model_with_shape_infer, onnx_quantizer.save_and_reload_model_with_shape_infer
    # quantize_dynamic's first inference: as from a file (load_model_with_shape_infer), tensors as they were;
    # ONNXQuantizer's: as through a file with external data, which marks the tensors it held as loaded from it.
    quantize.save_and_reload_model_with_shape_infer = lambda model: _inferred_in_place(model, False)
    onnx_quantizer.save_and_reload_model_with_shape_infer = lambda model: _inferred_in_place(model, True)
    try:
        yield
    finally:
        quantize.save_and_reload_model_with_shape_infer, onnx_quantizer.save_and_reload_model_with_shape_infer = \
            originals


@contextlib.contextmanager
def conformed_on_save() -> Iterator[None]:
    """ORT's quantizers write their graph conformed (``core.onnx_spec.conform``), meanwhile.

    ``quantize_graph`` loads what a quantizer wrote, conforms it (node order,
    stale value_info) and writes it again where anything changed, which every
    int8 graph of ORT's did (its node sort is not the spec's order). Conformed in
    ORT's save right after its own sort, the file is the one that second write
    gave, written once (MiniLM-L6: 23 MB less written and serialized per graph;
    byte for byte: tests/quantize/test_quantize.py).
    """
    import importlib

    from lora_edge.core.onnx_spec import conform

    onnx_model = importlib.import_module("onnxruntime.quantization.onnx_model")
    original = onnx_model.ONNXModel.save_model_to_file

    def save_model_to_file(self, output_path, use_external_data_format=False):
        ort_sort = self.topological_sort

        def sort_then_conform():
            ort_sort()
            conform(self.model)

        self.topological_sort = sort_then_conform  # the instance's, for this save only
        try:
            return original(self, output_path, use_external_data_format)
        finally:
            del self.topological_sort

    onnx_model.ONNXModel.save_model_to_file = save_model_to_file
    try:
        yield
    finally:
        onnx_model.ONNXModel.save_model_to_file = original


@contextlib.contextmanager
def per_tensor_in_place() -> Iterator[None]:
    """ORT's per-tensor weight quantization (embedding tables: Gather) with one temporary array instead of four.

    ``quant_utils.quantize_nparray`` computes ``(w.astype(float32) / scale).round()
    + zero_point`` as a new array per step: for MiniLM-L6's word embeddings (47 MB)
    200 MB of fresh memory per graph, which page faults made 1-4 s of the quantize
    stage on this project's machine. :func:`_quantize_nparray_in_place` does the
    same float32 steps through one small reused buffer (the same bytes: tests/quantize/test_quantize.py);
    anything else (float8, 4-bit, a step that would not stay float32) goes to ORT's own.
    """
    import importlib

    quant_utils = importlib.import_module("onnxruntime.quantization.quant_utils")
    original = quant_utils.quantize_nparray

    def quantize_nparray(qType, arr, scale, zero_point, low=None, high=None):  # noqa: N803
        done = _quantize_nparray_in_place(qType, arr, scale, zero_point, low, high)
        return original(qType, arr, scale, zero_point, low, high) if done is None else done

    quant_utils.quantize_nparray = quantize_nparray  # read by quant_utils.quantize_data
    try:
        yield
    finally:
        quant_utils.quantize_nparray = original


# Elements per step of :func:`_quantize_nparray_in_place`: a 1 MB float32 buffer, reused (cache- and fault-warm).
QUANTIZE_CHUNK = 1 << 18


def _quantize_nparray_in_place(q_type: int, arr, scale, zero_point, low, high) -> "np.ndarray | None":
    """ORT's ``quantize_nparray`` for 8/16-bit integers, its float32 steps done in place on one small buffer; else None.

    The steps are elementwise, so they run a chunk at a time through one reused
    float32 buffer (:data:`QUANTIZE_CHUNK` elements) into the integer result: no
    float32 copy of the whole table (47 MB of fresh memory per graph for
    MiniLM-L6's word embeddings, 0.55 s of page faults each at load ~6 on this
    project's machine), the same bytes (tests/quantize/test_quantize.py).
    """
    import numpy as np
    from onnx import TensorProto
    from onnxruntime.quantization.quant_utils import ONNX_TYPE_TO_NP_TYPE, get_qmin_qmax_for_qType

    if q_type not in (TensorProto.INT8, TensorProto.UINT8, TensorProto.INT16, TensorProto.UINT16):
        return None
    source = np.asarray(arr)
    flat = source.reshape(-1)  # a view of a contiguous array (ORT passes a flattened copy)
    buffer = np.empty(min(QUANTIZE_CHUNK, flat.size), dtype=np.float32)
    if np.result_type(buffer, scale) != np.float32 or np.result_type(buffer, zero_point) != np.float32:
        return None
    qmin, qmax = get_qmin_qmax_for_qType(q_type, reduce_range=False, symmetric=False)
    lowest, highest = max(qmin, low) if low is not None else qmin, min(qmax, high) if high is not None else qmax
    result = np.empty(flat.shape, dtype=ONNX_TYPE_TO_NP_TYPE[q_type])
    for start in range(0, flat.size, QUANTIZE_CHUNK):
        stop = min(start + QUANTIZE_CHUNK, flat.size)
        values = buffer[:stop - start]
        np.copyto(values, flat[start:stop], casting="unsafe")  # arr.astype(float32), a chunk at a time
        np.divide(values, scale, out=values)
        np.round(values, out=values)
        np.add(values, zero_point, out=values)
        np.clip(values, lowest, highest, out=values)
        np.copyto(result[start:stop], values, casting="unsafe")  # .astype(the integer type)
    return result.reshape(source.shape)


# onnx.save_model(..., save_as_external_data=True)'s default: tensors whose raw data reach this size
# (as sys.getsizeof counts it) go to the data file.
EXTERNAL_DATA_THRESHOLD = 1024


def _inferred_in_place(model: "onnx.ModelProto", through_external_data: bool) -> "onnx.ModelProto":
    """``model`` with ``onnx.shape_inference``'s shapes, inferred on its weightless twin; returns ``model``.

    What ORT's ``save_and_reload_model_with_shape_infer`` returns, without its copies:
    the graph's nodes, inputs, outputs and value infos come from the inferred twin,
    the initializers stay ``model``'s own, and ORT's inference marker is added.
    ``through_external_data``: the initializers a save with external data would have
    moved out say they are stored in the model (``data_location`` DEFAULT), as after
    loading them back.
    """
    import sys

    import onnx
    from onnxruntime.quantization.quant_utils import add_infer_metadata

    from lora_edge.core.onnx_io import weightless_twin

    inferred = onnx.shape_inference.infer_shapes(weightless_twin(model))
    for descriptor, value in inferred.graph.ListFields():
        if descriptor.name != "initializer":
            model.graph.ClearField(descriptor.name)
            target = getattr(model.graph, descriptor.name)
            if hasattr(value, "CopyFrom"):
                target.CopyFrom(value)
            elif isinstance(value, (str, bytes)):
                setattr(model.graph, descriptor.name, value)
            else:
                target.extend(value)
    del inferred
    if through_external_data:
        for tensor in model.graph.initializer:
            if tensor.HasField("raw_data") and sys.getsizeof(tensor.raw_data) >= EXTERNAL_DATA_THRESHOLD:
                tensor.data_location = onnx.TensorProto.DEFAULT
    add_infer_metadata(model)
    return model


class _FeedsReader:
    """onnxruntime.quantization CalibrationDataReader over a list of feed dicts."""

    def __init__(self, feeds: list[dict]):
        self._feeds = iter(feeds)

    def get_next(self):
        return next(self._feeds, None)


def quantize_int8_static(job: QuantizeJob) -> dict:
    """int8 weights and activations with scales calibrated on data: QDQ, u8 activations, s8 weights."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    feeds = job.calibration()
    per_channel = job.options.per_channel
    extra = _common_extra_options()
    # Dequantize matmul outputs straight to float: ORT then runs MatMulIntegerToFloat, with
    # no extra Q/DQ pair between a linear layer and its bias/residual adds.
    extra["OpTypesToExcludeOutputQuantization"] = list(STATIC_OP_TYPES)
    quantize_static(job.model, job.target, _FeedsReader(feeds), quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=STATIC_OP_TYPES, per_channel=per_channel,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    nodes_to_exclude=job.roles.keep_float,
                    calibrate_method=methods[job.options.calib_method.value], extra_options=extra)
    return {"format": "QDQ", "weights": "s8", "activations": "u8", "per_channel": per_channel,
            "calib_method": job.options.calib_method.value, "calib_batches": len(feeds)}


def gemm_to_matmul(model: "onnx.ModelProto", names: set[str]) -> int:
    """Rewrite the Gemm nodes in ``names`` (alpha=beta=1, transA=0) as MatMul (+ Add); return how many.

    A constant weight is stored pre-transposed; a weight fed at run time (hot-swap
    head) gets a Transpose node, so it stays a graph input. The MatMul keeps the
    Gemm's name.
    """
    from onnx import helper

    from lora_edge.core.onnx_spec import GraphIndex

    if not names:
        return 0
    index = GraphIndex(model)
    nodes, count = [], 0
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type != "Gemm" or node.name not in names or attrs.get("transA", 0) or \
                attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
            nodes.append(node)
            continue
        weight, matrix = node.input[1], index.constant(node.input[1])
        if attrs.get("transB", 0) and matrix is not None:
            weight = _transposed_initializer(model, index, node.input[1], matrix)
        elif attrs.get("transB", 0):
            weight = f"{node.input[1]}_transposed"
            nodes.append(helper.make_node("Transpose", [node.input[1]], [weight], name=f"{node.name}_transpose"))
        product = node.output[0] if len(node.input) < 3 or not node.input[2] else f"{node.output[0]}_nobias"
        nodes.append(helper.make_node("MatMul", [node.input[0], weight], [product], name=node.name))
        if product != node.output[0]:
            nodes.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]],
                                          name=f"{node.name}_bias"))
        count += 1
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return count


def _transposed_initializer(model: "onnx.ModelProto", index, name: str, matrix=None) -> str:
    """The name of an initializer holding ``matrix.T`` (``<name>_matmul``), added once per source weight.

    Without ``matrix``, of initializer ``name``: a weight left in its file
    (:func:`lora_edge.core.onnx_io.load_by_reference`) is not read, its transpose is a stub too.
    """
    from onnx import numpy_helper

    from lora_edge.core.onnx_io import transposed_reference

    weight = f"{name}_matmul"
    if weight not in index.initializers:
        stub = transposed_reference(index.initializers[name], weight) if matrix is None else None
        if stub is None:
            matrix = index.constant(name) if matrix is None else matrix
            stub = numpy_helper.from_array(matrix.T.copy(), weight)
        model.graph.initializer.append(stub)
        index.initializers[weight] = model.graph.initializer[-1]
    return weight


def fold_weight_transposes(model: "onnx.ModelProto", names: set[str]) -> int:
    """Give the MatMul nodes in ``names`` that read ``Transpose(W)`` of an initializer ``W.T`` as an initializer.

    Export stores such weights transposed (``export.exporter.fold_stub_transposes``),
    but bundles written before that, and a weight that another node reads too,
    keep ``MatMul(x, Transpose(W))``; MatMulNBits quantizes initializer weights
    only, so that linear would stay fp32. The Transpose and ``W`` go when
    nothing else reads them. Returns how many nodes were rewired.
    """
    from onnx import helper

    from lora_edge.core.onnx_spec import GraphIndex

    index = GraphIndex(model)
    orphans = []
    for node in model.graph.node:
        transpose = index.producer.get(node.input[1]) if node.op_type == "MatMul" and node.name in names else None
        if transpose is None or transpose.op_type != "Transpose" or transpose.input[0] not in index.initializers:
            continue
        perm = next((helper.get_attribute_value(a) for a in transpose.attribute if a.name == "perm"), None)
        if not index.is_constant(transpose.input[0]) or len(index.initializers[transpose.input[0]].dims) != 2 \
                or perm not in (None, [1, 0]):
            continue
        node.input[1] = _transposed_initializer(model, index, transpose.input[0])
        orphans.append(transpose)
    _drop_unread_transposes(model, orphans, index.graph_outputs)
    return len(orphans)


def _drop_unread_transposes(model: "onnx.ModelProto", transposes: list, graph_outputs: set[str]) -> None:
    """Remove the ``transposes`` nothing reads any more, and their source initializers when unread too."""
    readers = {name for node in model.graph.node for name in node.input} | graph_outputs
    gone = {id(node) for node in transposes if node.output[0] not in readers}
    kept = [node for node in model.graph.node if id(node) not in gone]
    del model.graph.node[:]
    model.graph.node.extend(kept)
    readers = {name for node in model.graph.node for name in node.input} | graph_outputs
    sources = {node.input[0] for node in transposes} - readers
    for init in [init for init in model.graph.initializer if init.name in sources]:
        model.graph.initializer.remove(init)


def quantize_int4(job: QuantizeJob) -> dict:
    """4-bit weight-only (MatMulNBits, blocks of ``block_size``); embeddings too (GatherBlockQuantized).

    Zero points are on by default (``int4_symmetric`` off): on SmolLM2-135M's
    chat rows they moved next-token agreement with fp32 from 0.78 to 0.80-0.81
    and perplexity from +4.9% to -5..-8% at the same decode speed
    (docs/ARCHITECTURE.md, "Facts"). A tied LM head (``job.tied``) is
    quantized symmetric in a pass of its own, so the tied embedding reads its
    blocks as they are (:func:`_share_tied`); the lookup gets no blocks of its own.
    """
    options = job.options
    model, job.model = job.model, None  # the job's model is quantized in place: no second copy of the weights
    converted = gemm_to_matmul(model, set(job.roles.base))
    fold_weight_transposes(model, set(job.roles.base))  # (weights left in the fp32 file stay there)
    head_nodes = [node.name for node in model.graph.node
                  if job.tied and node.op_type == "MatMul" and node.input[1] == job.tied.head]
    lookup = [job.tied.gather] if head_nodes else []  # reads the head's blocks instead
    exclude = list(job.roles.keep_float)
    passes = [(options.int4_symmetric, exclude + head_nodes + lookup, ("MatMul", "Gather"))]
    if head_nodes:  # symmetric: the tied embedding can then read the head's blocks as they are
        others = [node.name for node in model.graph.node if node.name not in head_nodes]  # (nodes_to_include adds)
        passes.insert(0, (True, others, ("MatMul",)))
    for symmetric, nodes_to_exclude, op_types in passes:
        model = _int4_pass(model, options, symmetric, nodes_to_exclude, op_types)
    details = {"bits": 4, "block_size": options.block_size, "symmetric": options.int4_symmetric,
               "accuracy_level": options.int4_accuracy_level, "gemm_as_matmul": converted,
               **({"tied_head_symmetric": True} if head_nodes else {})}
    if lookup and _share_tied(model, job.tied, job.target):
        details["tied_embedding"] = "shared with the quantized LM head"
    else:
        _save_int4(quantize_lookups(model, options) if lookup else model, job.target)
    return details


def _share_tied(model: "onnx.ModelProto", tied: "TiedEmbedding", path: Path) -> bool:
    """Order ``model`` as :func:`_save_int4` and conform it, make its lookup read the head's blocks, and save it
    to ``path`` (the graph of saving, conforming, sharing); False (nothing saved) when the blocks do not fit."""
    from onnxruntime.quantization.onnx_model import ONNXModel

    from lora_edge.core.onnx_io import resolve_references, save_streamed
    from lora_edge.core.onnx_spec import conform
    from lora_edge.quantize.decoder import share_tied_embedding

    ONNXModel(model).topological_sort()
    conform(model)
    if not share_tied_embedding(model, tied):
        return False
    resolve_references(model)
    save_streamed(model, path)  # (onnx.save's bytes)
    return True


def _int4_pass(model: "onnx.ModelProto", options: "QuantizeOptions", symmetric: bool, nodes_to_exclude: list[str],
               op_types: tuple[str, ...]) -> "onnx.ModelProto":
    """One MatMulNBitsQuantizer pass over ``model`` (changed in place); the quantized model.

    A pass with only 2-D float32 MatMul weights to quantize is :func:`_int4_matmuls` (the same graph, without
    reading weights into the model first); any other goes to ORT's quantizer.
    """
    import numpy as np
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from lora_edge.core.onnx_io import resolve_references

    if _matmuls_only(model, set(nodes_to_exclude), op_types):
        return _int4_matmuls(model, options, symmetric, set(nodes_to_exclude), "Gather" in op_types)
    resolve_references(model)  # ORT reads the weights from the model
    quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=options.block_size, is_symmetric=symmetric,
                                     accuracy_level=options.int4_accuracy_level,
                                     nodes_to_exclude=nodes_to_exclude, op_types_to_quantize=op_types)
    with np.errstate(invalid="ignore", divide="ignore"):  # all-zero blocks: ORT maps their 0/0 scale to 0
        quantizer.process()
    return quantizer.model.model


def _matmuls_only(model: "onnx.ModelProto", excluded: set[str], op_types: tuple[str, ...]) -> bool:
    """True when what ORT's pass would quantize in ``model`` is 2-D float32 MatMul weights only (no subgraph)."""
    from onnx import AttributeProto, TensorProto

    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    for node in model.graph.node:
        if any(a.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS) for a in node.attribute):
            return False
        if node.name in excluded or node.op_type not in op_types:
            continue
        if node.op_type == "Gather" and node.input[0] in initializers:
            return False
        weight = initializers.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) > 1 else None
        if weight is not None and (len(weight.dims) != 2 or weight.data_type != TensorProto.FLOAT):
            return False
    return True


def _int4_matmuls(model: "onnx.ModelProto", options: "QuantizeOptions", symmetric: bool, excluded: set[str],
                  gather: bool) -> "onnx.ModelProto":
    """ORT's MatMulNBitsQuantizer pass, node for node and tensor for tensor, on 2-D float32 MatMul weights.

    Each weight is read (:class:`lora_edge.core.onnx_io.ColumnReader`: from the
    fp32 file when it was left there) and quantized by ORT's own C++ blockwise
    quantizer, one at a time: the model never holds the float weights it replaces.
    """
    from onnxruntime.quantization.onnx_model import ONNXModel

    from lora_edge.core.onnx_io import ColumnReader

    wrapped = ONNXModel(model)
    wrapped.set_opset_import("com.microsoft", 1)
    if gather:  # as ORT's pass over Gathers declares it (int4 tensors need opset 21, IR 10)
        for opset in wrapped.opset_import():
            if opset.domain in (None, "ai.onnx", "") and opset.version < 21:
                wrapped.set_opset_import(opset.domain, 21)
        model.ir_version = max(model.ir_version, 10)
    graph = model.graph
    initializers: dict = {}
    for tensor in graph.initializer:
        initializers.setdefault(tensor.name, tensor)
    nodes, buffers = [], _ReusedArrays()
    with ColumnReader() as reader:
        for node in graph.node:
            weight = initializers.get(node.input[1]) if node.op_type == "MatMul" and node.name not in excluded \
                and len(node.input) > 1 else None
            nodes.append(node if weight is None else
                         _matmul_nbits(graph, node, weight, options, symmetric, reader, buffers))
    graph.ClearField("node")
    graph.node.extend(nodes)
    wrapped.clean_initializers()
    return wrapped.model


# Bytes of float32 weight columns quantized per call of ORT's quantizer: a small LLM's linears in one call each,
# an LM head in bands (a transposed one is transposed band by band, in a buffer that stays in the CPU's cache).
INT4_BAND_BYTES = 4 << 20


class _ReusedArrays:
    """Arrays in buffers kept from one weight to the next, one buffer per purpose.

    A fresh array per weight is fresh memory pages per weight, and first touches
    of pages are what made the int4 pass slow on this project's VM (a buffer that
    is reused costs its pages once).
    """

    def __init__(self) -> None:
        self._buffers: dict = {}

    def array(self, purpose: str, shape: tuple[int, ...], dtype, zeros: bool = True) -> "np.ndarray":
        """A C-contiguous array (of zeros, or as the buffer holds it), valid until the next call for ``purpose``."""
        import math

        import numpy as np

        size = math.prod(shape) * np.dtype(dtype).itemsize
        buffer = self._buffers.get(purpose)
        if buffer is None or buffer.nbytes < size:
            buffer = self._buffers[purpose] = np.empty(size, np.uint8)
        array = buffer[:size].view(dtype).reshape(shape)
        if zeros:
            array.fill(0)
        return array


def _matmul_nbits(graph, node, weight, options: "QuantizeOptions", symmetric: bool, reader, buffers: _ReusedArrays,
                  ) -> "onnx.NodeProto":
    """``node`` as MatMulNBits, its blocks, scales (and zero points) added to ``graph`` as ORT adds them."""
    from onnx import helper, numpy_helper

    rows, cols = weight.dims  # [K, N]
    block = options.block_size
    packed, scales, zero_points = _quantized_blocks(weight, block, symmetric, reader, buffers)
    quantized = _serialized(packed, weight.name + "_Q4")
    scales_tensor = _serialized(scales, weight.name + "_scales")
    for value in graph.input:
        if value.name == node.input[1]:
            graph.input.remove(value)
            break
    graph.initializer.extend([quantized, scales_tensor])
    inputs = [node.input[0], quantized.name, scales_tensor.name]
    if not symmetric:
        graph.initializer.extend([numpy_helper.from_array(zero_points, weight.name + "_zero_points")])
        inputs.append(weight.name + "_zero_points")
    attributes = {"K": rows, "N": cols, "bits": 4, "block_size": block}
    if options.int4_accuracy_level:
        attributes["accuracy_level"] = options.int4_accuracy_level
    return helper.make_node("MatMulNBits", inputs=inputs, outputs=[node.output[0]],
                            name=node.name + "_Q4" if node.name else "", domain="com.microsoft", **attributes)


def _serialized(array: "np.ndarray", name: str) -> "onnx.TensorProto":
    """``array`` as a TensorProto, as ORT's quantizer writes it (through onnx_ir)."""
    import onnx_ir as ir

    return ir.serde.serialize_tensor(ir.Tensor(array, name=name))


def _quantized_blocks(weight, block: int, symmetric: bool, reader, buffers: _ReusedArrays) -> tuple:
    """(packed blocks [N, blocks, block/2], scales [N, blocks], zero points [N, blocks/2]) of the float32 ``weight``
    [K, N], in reused buffers: ORT's ``quantize_matmul_4bits`` on the whole weight, a band of columns at a time.

    Its blocks run down the K rows of one column: each column's blocks, scales and
    zero points are its own, so quantizing bands of columns gives the same bytes.
    Rows past K up to a whole block are zeros, as ORT pads them.
    """
    import numpy as np
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits

    rows, cols = weight.dims
    blocks = (rows + block - 1) // block
    packed = buffers.array("packed", (cols, blocks, (block + 1) // 2), np.uint8)
    zero_points = buffers.array("zero_points", (cols, (blocks + 1) // 2), np.uint8)
    scales = buffers.array("scales", (cols, blocks), np.float32)
    step = max(64, INT4_BAND_BYTES // (4 * blocks * block) // 64 * 64)  # whole 64-column groups
    for start in range(0, cols, step):
        stop = min(start + step, cols)
        values = buffers.array("values", (blocks * block, stop - start), np.float32, zeros=False)  # (read row-major)
        reader.read_columns(weight, start, stop, values[:rows])
        values[rows:] = 0
        with np.errstate(invalid="ignore", divide="ignore"):
            quantize_matmul_4bits(packed[start:stop], values, scales[start:stop], zero_points[start:stop], block,
                                  stop - start, rows, symmetric)
    return packed, scales, zero_points


def _save_int4(model: "onnx.ModelProto", path: Path) -> None:
    """Save as MatMulNBitsQuantizer saves (its topological order), with any weight still in the fp32 file."""
    from onnxruntime.quantization.onnx_model import ONNXModel

    from lora_edge.core.onnx_io import resolve_references

    resolve_references(model)
    ONNXModel(model).save_model_to_file(str(path), use_external_data_format=False)


def quantize_lookups(model: "onnx.ModelProto", options: "QuantizeOptions") -> "onnx.ModelProto":
    """The int4 pass over the embedding lookups :func:`quantize_int4` left float (a tied lookup that could not
    read the LM head's blocks after all): blocks of their own, as one pass over MatMuls and Gathers gives them."""
    return _int4_pass(model, options, options.int4_symmetric, [], ("Gather",))


QUANTIZERS: dict[Precision, Callable[[QuantizeJob], dict]] = {
    Precision.FP16: quantize_fp16,
    Precision.INT8_DYNAMIC: quantize_int8_dynamic,
    Precision.INT8_STATIC: quantize_int8_static,
    Precision.INT4: quantize_int4,
}
# Precisions whose graphs run on GPUs: ORT's fused kernels (SkipLayerNormalization) are fast there.
GPU_PRECISIONS = {Precision.FP16}

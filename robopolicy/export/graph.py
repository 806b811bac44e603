"""ONNX graph work for exported policies: simplification, CPU-tuned rewrites, op and FLOP counts.

The exported graph has static shapes (batch 1), so every tensor shape is known and the
rewrites below bake shapes into constants. Each rewrite computes the same function (the
export's parity check runs on the rewritten graph); it only changes which ONNX Runtime CPU
kernels compute it. Measured on a 2-core Xeon (AVX-512) for the default state U-Net:

* :func:`convs_as_gemm`: a 1-D ``Conv`` / ``ConvTranspose`` over a short sequence (the
  U-Net's ``T`` is 4..16) becomes, inside MLAS, a GEMM whose N dimension is ``T``: most of
  each vector register idles (~30 GFLOP/s against ~130 for a square matmul). Rewritten as
  ``Z = X^T W'`` (N = ``k * C_out``, the weights pre-packed once at session start) and a
  tiny constant 0/1 GEMM that applies the taps, padding and stride: 2-3x faster per conv.
* :func:`fast_softplus`: ONNX Runtime has no CPU ``Mish`` kernel and its ``Softplus`` is a
  scalar loop (~20 us per 1024 values); Mish as ``x * tanh(log(1 + exp(x)))`` from
  vectorized Exp/Log/Tanh is the same function at ~8 us.
* :func:`channel_affines_as_batchnorm`: per-channel ``x * s + b`` (every FiLM modulation
  and GroupNorm affine) in one vectorized kernel instead of two slow broadcasts.

Tried and dropped (no measurable gain): pre-expanding other broadcast constants, merging
the FiLM Split / Unsqueeze / Slice plumbing, fusing consecutive Reshapes, and a runtime
``Expand`` before broadcasts (slower than the broadcast itself).
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnx
from onnx import helper, numpy_helper

#: A 1-D convolution is rewritten as GEMMs when the N dimension of the GEMM that ONNX Runtime
#: would run for it (output length for Conv, input length for ConvTranspose) is below this:
#: one AVX-512 vector of floats. From there on MLAS' own convolution is as fast (measured).
GEMM_CONV_MAX_N = 15


def simplify(model_bytes: bytes, out: Path) -> onnx.ModelProto:
    """Constant-fold and clean a freshly exported graph with ONNX Runtime's portable (basic) passes.

    Basic-level passes emit only standard ONNX ops (no hardware-specific layouts), so the
    result runs on any backend; it is written to ``out`` and returned with inferred shapes.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(out)
    options.log_severity_level = 3
    ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    return onnx.shape_inference.infer_shapes(onnx.load(str(out)), strict_mode=True)


def optimize_for_cpu(model: onnx.ModelProto) -> onnx.ModelProto:
    """All CPU rewrites of this module, in order, on a simplified static-shape graph."""
    graph = _Graph(model)
    convs_as_gemm(graph)
    fast_softplus(graph)
    channel_affines_as_batchnorm(graph)
    return graph.finish()


# -- counting --------------------------------------------------------------------------------
def op_histogram(model: onnx.ModelProto) -> dict[str, int]:
    """Node count per op type, most frequent first."""
    return dict(collections.Counter(n.op_type for n in model.graph.node).most_common())


def count_flops(model: onnx.ModelProto) -> int:
    """Multiply-add FLOPs (2 per MAC) of the Conv, ConvTranspose, Gemm and MatMul nodes.

    Needs inferred static shapes; elementwise ops and normalizations are left out (they are
    a few percent of the arithmetic of a conv net).
    """
    shapes = _shapes(model)
    macs = 0
    for node in model.graph.node:
        if node.op_type in ("Conv", "ConvTranspose"):
            w = shapes[node.input[1]]
            out = shapes[node.output[0]]
            # Conv: out [N, Cout, *S] and w [Cout, Cin/g, *k]; ConvTranspose: in [N, Cin, *S], w [Cin, Cout/g, *k].
            spatial = out if node.op_type == "Conv" else shapes[node.input[0]]
            macs += int(np.prod(w)) * spatial[0] * int(np.prod(spatial[2:]))
        elif node.op_type in ("Gemm", "MatMul"):
            a, y = shapes[node.input[0]], shapes[node.output[0]]
            trans_a = node.op_type == "Gemm" and _attr(node, "transA", 0)
            k = a[-2] if trans_a else a[-1]
            macs += int(np.prod(y)) * k
    return 2 * macs


def weight_bytes_read(model: onnx.ModelProto) -> int:
    """Bytes of constant weights the GEMM / conv nodes read per run (a weight read by k nodes counts k times)."""
    sizes = {i.name: int(np.prod(i.dims)) * np.dtype(helper.tensor_dtype_to_np_dtype(i.data_type)).itemsize
             for i in model.graph.initializer}
    ops = ("Conv", "ConvTranspose", "Gemm", "MatMul")
    return sum(sizes.get(name, 0) for n in model.graph.node if n.op_type in ops for name in n.input[:2])


# -- rewrites --------------------------------------------------------------------------------
def convs_as_gemm(graph: "_Graph") -> None:
    """Rewrite short 1-D ``Conv`` / ``ConvTranspose`` nodes over ``[1, C, T]`` as two GEMMs.

    ``Z = X^T W'`` with ``W'[c, j*Cout + o]`` the tap-``j`` weight gives every tap's
    contribution ``[T, k*Cout]``; viewed as ``[T*k, Cout]`` rows ``t*k + j``, the output is
    ``Y = (S Z + b)^T`` where the constant ``S [T_out, T*k]`` is 1 where input step ``t``
    through tap ``j`` lands on output step ``t_out`` (this encodes padding and stride, and
    works for the transposed convolution with its own landing rule). Both GEMMs have the
    channels as their N dimension; the final transpose moves ~1 K floats.
    """
    shared: dict[tuple, list[str]] = {}  # the unrolled sampler reuses each conv's weights every step
    for node in list(graph.nodes):
        plan = _conv_plan(graph, node)
        if plan is None:
            continue
        name = graph.fresh(node.name or node.output[0])
        has_bias = len(node.input) > 2 and bool(node.input[2])
        key = (node.op_type, *node.input[1:], plan.length, plan.out_len, plan.taps.tobytes())
        if key not in shared:
            shared[key] = [graph.constant(f"{name}/weight", plan.weight), graph.constant(f"{name}/taps", plan.taps)]
            if has_bias:
                shared[key].append(graph.constant(f"{name}/bias", graph.initializer(node.input[2])))
        weight, taps, *bias = shared[key]
        x2, z, zr, yt, y2 = (f"{name}/{s}" for s in ("x2", "z", "zr", "yt", "y2"))
        graph.replace(node, [
            helper.make_node("Reshape", [node.input[0], graph.shape_constant([plan.c_in, plan.length])], [x2]),
            helper.make_node("Gemm", [x2, weight], [z], transA=1),
            helper.make_node("Reshape", [z, graph.shape_constant([plan.length * plan.k, plan.c_out])], [zr]),
            helper.make_node("Gemm", [taps, zr, *bias], [yt]),
            helper.make_node("Transpose", [yt], [y2], perm=[1, 0]),
            helper.make_node("Reshape", [y2, graph.shape_constant([1, plan.c_out, plan.out_len])], [node.output[0]]),
        ])


def fast_softplus(graph: "_Graph") -> None:
    """``Softplus`` feeding only ``Tanh`` (Mish) -> ``Log(1 + Exp(x))``; a ``Mish`` node -> the same, expanded.

    For large ``x`` ``Exp`` overflows to ``inf`` and ``tanh(inf) = 1 = tanh(x)``: exact under
    Tanh, which is why a Softplus with any other consumer is left alone.
    """
    one = None
    for node in list(graph.nodes):
        is_mish = node.op_type == "Mish"
        if not is_mish and not (
            node.op_type == "Softplus" and all(c.op_type == "Tanh" for c in graph.consumers(node.output[0]))
        ):
            continue
        one = one or graph.constant("softplus/one", np.array(1.0, np.float32))
        name = graph.fresh(node.name or node.output[0])
        x = node.input[0]
        softplus = f"{name}/softplus" if is_mish else node.output[0]
        nodes = [
            helper.make_node("Exp", [x], [f"{name}/exp"]),
            helper.make_node("Add", [f"{name}/exp", one], [f"{name}/exp1"]),
            helper.make_node("Log", [f"{name}/exp1"], [softplus]),
        ]
        if is_mish:
            nodes += [
                helper.make_node("Tanh", [softplus], [f"{name}/tanh"]),
                helper.make_node("Mul", [x, f"{name}/tanh"], [node.output[0]]),
            ]
        graph.replace(node, nodes)


def channel_affines_as_batchnorm(graph: "_Graph") -> None:
    """``Add(Mul(x, s), b)`` with per-channel ``s``, ``b`` of shape ``[1, C, 1]`` -> ``BatchNormalization``.

    ONNX Runtime's CPU broadcasting loops over the inner span: a ``[1, C, 1]`` operand on a
    ``[1, C, T]`` tensor runs ``C`` tiny loops of ``T`` (~8 us for this Mul + Add at C = 256,
    T = 4). Inference-mode BatchNormalization with mean 0, variance 1 and epsilon 0 is
    exactly ``x * s + b`` per channel in one vectorized kernel (~2 us), and takes ``s``, ``b``
    as runtime inputs too: this is every FiLM modulation and GroupNorm affine of the U-Net.
    """
    for mul in list(graph.nodes):
        if mul.op_type != "Mul" or len(graph.shape(mul.output[0])) < 3:
            continue
        full = graph.shape(mul.output[0])
        users = graph.consumers(mul.output[0])
        scale = _channel_operand(graph, mul, full)
        if scale is None or len(users) != 1 or users[0].op_type != "Add" or mul.output[0] in graph.outputs:
            continue
        add = users[0]
        shift = _channel_operand(graph, add, full)
        if shift is None or shift == mul.output[0]:
            continue
        x = next(i for i in mul.input if i != scale)
        name = graph.fresh(mul.name or mul.output[0])
        c = full[1]
        as_vector = graph.shape_constant([c])
        zeros = graph.constant(f"batchnorm/zeros{c}", np.zeros(c, np.float32))
        ones = graph.constant(f"batchnorm/ones{c}", np.ones(c, np.float32))
        graph.remove(mul)
        graph.replace(add, [
            helper.make_node("Reshape", [scale, as_vector], [f"{name}/scale"]),
            helper.make_node("Reshape", [shift, as_vector], [f"{name}/shift"]),
            helper.make_node("BatchNormalization", [x, f"{name}/scale", f"{name}/shift", zeros, ones],
                             list(add.output), epsilon=0.0),
        ])


def _channel_operand(graph: "_Graph", node: onnx.NodeProto, full: list[int]) -> str | None:
    """The input of binary ``node`` that broadcasts as ``[1, C, 1, ...]`` to its output ``[1, C, ...]``
    (the other input having the full shape), else None."""
    if len(node.input) != 2 or graph.shape(node.output[0]) != full or full[0] != 1:
        return None
    per_channel = [1, full[1]] + [1] * (len(full) - 2)
    a, b = node.input
    for mine, other in ((a, b), (b, a)):
        shape = graph.shape(mine)
        if [1] * (len(full) - len(shape)) + shape == per_channel and graph.shape(other) == full:
            return mine
    return None


# -- helpers ---------------------------------------------------------------------------------
def _attr(node: onnx.NodeProto, name: str, default: object) -> object:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    """Static shapes of every value, initializer and graph input/output (unknown dims -> -1)."""
    shapes: dict[str, list[int]] = {}
    for v in itertools.chain(model.graph.input, model.graph.value_info, model.graph.output):
        dims = v.type.tensor_type.shape.dim
        shapes[v.name] = [d.dim_value if d.HasField("dim_value") else -1 for d in dims]
    for init in model.graph.initializer:
        shapes[init.name] = list(init.dims)
    return shapes


class _ConvPlan(NamedTuple):
    c_in: int
    c_out: int
    k: int
    length: int
    out_len: int
    weight: np.ndarray  # W' [Cin, k*Cout]
    taps: np.ndarray  # S [T_out, T*k]


def _conv_plan(graph: "_Graph", node: onnx.NodeProto) -> _ConvPlan | None:
    """How to rewrite ``node`` as GEMMs, or None if it is not a short static 1-D conv with constant weights."""
    if node.op_type not in ("Conv", "ConvTranspose") or node.domain not in ("", "ai.onnx"):
        return None
    w = graph.initializer(node.input[1])
    has_bias = len(node.input) > 2 and bool(node.input[2])
    x_shape, y_shape = graph.shape(node.input[0]), graph.shape(node.output[0])
    if (
        w is None or (has_bias and graph.initializer(node.input[2]) is None)
        or w.ndim != 3 or len(x_shape) != 3 or x_shape[0] != 1 or -1 in x_shape or -1 in y_shape
        or _attr(node, "group", 1) != 1 or any(d != 1 for d in _attr(node, "dilations", [1]))
        or _attr(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET")
        or (y_shape if node.op_type == "Conv" else x_shape)[2] > GEMM_CONV_MAX_N
    ):
        return None
    c_in, length, out_len, k = x_shape[1], x_shape[2], y_shape[2], w.shape[2]
    stride = _attr(node, "strides", [1])[0]
    pad = _attr(node, "pads", [0, 0])[0]
    taps = np.zeros((out_len, length * k), np.float32)
    for t, j in itertools.product(range(length), range(k)):
        if node.op_type == "Conv":  # output step o reads input step o*stride + j - pad
            o, rem = divmod(t - j + pad, stride)
            if rem:
                continue
        else:  # transposed: input step t writes output step t*stride + j - pad
            o = t * stride + j - pad
        if 0 <= o < out_len:
            taps[o, t * k + j] = 1.0
    # W'[c, j*Cout + o]: Conv weights are [Cout, Cin, k], ConvTranspose weights [Cin, Cout, k].
    per_tap = w.transpose(1, 2, 0) if node.op_type == "Conv" else w.transpose(0, 2, 1)
    weight = np.ascontiguousarray(per_tap.reshape(c_in, -1))
    return _ConvPlan(c_in, weight.shape[1] // k, k, length, out_len, weight, taps.astype(w.dtype))


class _Graph:
    """A mutable view of an ONNX graph: consumer index, static shapes, constants."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
        g = self.model.graph
        self.nodes: list[onnx.NodeProto] = list(g.node)
        self._consumers: dict[str, list[onnx.NodeProto]] = collections.defaultdict(list)
        self._index(self.nodes)
        self.inits: dict[str, onnx.TensorProto] = {i.name: i for i in g.initializer}
        self.outputs = {o.name for o in g.output}
        self.shapes = _shapes(self.model)
        self._names = itertools.count()
        self._arrays: dict[str, np.ndarray] = {}
        self._shape_consts: dict[tuple[int, ...], str] = {}

    # lookups
    def consumers(self, value: str) -> list[onnx.NodeProto]:
        return list(self._consumers.get(value, ()))

    def shape(self, value: str) -> list[int]:
        return self.shapes.get(value, [-1])

    def initializer(self, name: str) -> np.ndarray | None:
        if name not in self._arrays and name in self.inits:
            self._arrays[name] = numpy_helper.to_array(self.inits[name])
        return self._arrays.get(name)

    # edits
    def fresh(self, hint: str) -> str:
        return f"{hint}/rw{next(self._names)}"

    def constant(self, name: str, value: np.ndarray) -> str:
        value = np.asarray(value)
        self.inits[name] = numpy_helper.from_array(value, name)
        self._arrays[name] = value
        self.shapes[name] = list(value.shape)
        return name

    def shape_constant(self, dims: Iterable[int]) -> str:
        dims = tuple(int(d) for d in dims)
        if dims not in self._shape_consts:
            self._shape_consts[dims] = self.constant(f"shape/{'x'.join(map(str, dims))}", np.array(dims, np.int64))
        return self._shape_consts[dims]

    def replace(self, node: onnx.NodeProto, new_nodes: list[onnx.NodeProto]) -> None:
        """Put ``new_nodes`` where ``node`` was (they must compute its outputs)."""
        i = next(i for i, n in enumerate(self.nodes) if n is node)
        self._unindex(node)
        self.nodes[i : i + 1] = new_nodes
        self._index(new_nodes)

    def remove(self, node: onnx.NodeProto) -> None:
        self._unindex(node)
        self.nodes = [n for n in self.nodes if n is not node]

    def finish(self) -> onnx.ModelProto:
        """The edited model with unused initializers dropped, shapes re-inferred (strict) and checked."""
        g = self.model.graph
        del g.node[:]
        g.node.extend(self.nodes)
        del g.initializer[:]
        g.initializer.extend(t for name, t in self.inits.items() if self._consumers.get(name))
        del g.value_info[:]
        model = onnx.shape_inference.infer_shapes(self.model, strict_mode=True)
        onnx.checker.check_model(model)
        return model

    def _index(self, nodes: list[onnx.NodeProto]) -> None:
        for n in nodes:
            for i in n.input:
                self._consumers[i].append(n)

    def _unindex(self, node: onnx.NodeProto) -> None:
        for i in node.input:
            self._consumers[i] = [u for u in self._consumers[i] if u is not node]

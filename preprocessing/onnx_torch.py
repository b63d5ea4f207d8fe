"""A small ONNX graph run in torch (layer: preprocessing): the YuNet face detector on a GPU (`faces.YuNetDetector`
with `build.yunet_device`), from the same ONNX file OpenCV's DNN reads.

Why: OpenCV's DNN in opencv-python-headless runs on the CPU only, and there a YuNet pass over a 640-1024 px photo
costs ~25 ms, 5-8x the whole per-photo budget of an img2dataset-style download (benchmarks/RESULTS.md, issue 23).
torch is already in every worker image, with CUDA where the node has a GPU. The stack has no `onnx` package, so the
file is read here: the protobuf wire format (ModelProto -> GraphProto -> nodes, initializers), then the nodes run in
order as torch ops. Only the ops a YuNet graph uses are known (`OPS`); another is refused when the file is loaded,
naming it, never guessed at. Weights stored outside the file (`data_location` external) are refused too.
"""

from __future__ import annotations

import struct
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np

OPS = ("Conv", "Relu", "Sigmoid", "MaxPool", "Add", "Transpose", "Reshape", "Resize", "Concat")
_DTYPES = {1: np.float32, 6: np.int32, 7: np.int64, 11: np.float64}  # TensorProto.DataType


class OnnxError(ValueError):
    """The bytes are not an ONNX graph this runner can run (one line: what, and where)."""


class _Malformed(OnnxError):
    """The protobuf itself is broken (truncated, a wire type ONNX never uses)."""


def _varint(b: bytes, i: int) -> tuple[int, int]:
    out = shift = 0
    while True:
        if i >= len(b):
            raise _Malformed("truncated varint")
        x = b[i]
        i += 1
        out |= (x & 0x7F) << shift
        shift += 7
        if x < 0x80:
            return out, i


def _fields(b: bytes) -> dict[int, list]:
    """One protobuf message -> {field number: [values]} (varints as int, fixed64/32 and length-delimited as bytes)."""
    out: dict[int, list] = defaultdict(list)
    i = 0
    while i < len(b):
        key, i = _varint(b, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(b, i)
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, i = b[i:i + size], i + size
        elif wire == 2:
            size, i = _varint(b, i)
            value, i = b[i:i + size], i + size
        else:
            raise _Malformed(f"protobuf wire type {wire} (field {number})")
        if i > len(b):
            raise _Malformed(f"field {number} runs past the end of its message")
        out[number].append(value)
    return out


def _signed(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _ints(values: list) -> list[int]:
    """A repeated int64 field, packed (one bytes value) or not."""
    if len(values) == 1 and isinstance(values[0], bytes):
        out, i, b = [], 0, values[0]
        while i < len(b):
            v, i = _varint(b, i)
            out.append(_signed(v))
        return out
    return [_signed(v) for v in values]


def _tensor(b: bytes) -> tuple[str, np.ndarray]:
    t = _fields(b)
    name = t[8][0].decode() if t.get(8) else ""
    if t.get(14, [0])[0] == 1:
        raise OnnxError(f"tensor {name!r} keeps its data in an external file: not supported")
    code = t[2][0] if t.get(2) else 0
    if code not in _DTYPES:
        raise OnnxError(f"tensor {name!r} has data type {code}: not supported")
    dtype, dims = _DTYPES[code], _ints(t.get(1, []))
    if t.get(9):
        arr = np.frombuffer(t[9][0], dtype)
    elif code == 1 and t.get(4):
        packed = b"".join(v if isinstance(v, bytes) else struct.pack("<f", v) for v in t[4])
        arr = np.frombuffer(packed, "<f4")
    elif code in (6, 7) and (t.get(5) or t.get(7)):
        arr = np.array(_ints(t.get(7) or t.get(5)), dtype)
    else:
        arr = np.zeros(0, dtype)
    if arr.size != int(np.prod(dims, dtype=np.int64)):
        raise OnnxError(f"tensor {name!r}: {arr.size} values for dims {dims}")
    return name, arr.reshape(dims).copy()


def _attribute(b: bytes) -> tuple[str, Any]:
    a = _fields(b)
    name = a[1][0].decode()
    if a.get(8):
        return name, _ints(a[8])
    if a.get(3):
        return name, _signed(a[3][0])
    if a.get(2):
        return name, struct.unpack("<f", a[2][0])[0]
    if a.get(4):
        return name, a[4][0].decode()
    if a.get(7):
        return name, list(np.frombuffer(b"".join(a[7]), "<f4"))
    return name, None


@dataclass
class Node:
    op: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any]


class OnnxGraph:
    """An ONNX model's graph: `run(x)` gives its named outputs for the input tensor x, on the weights' device."""

    def __init__(self, data: bytes):
        try:
            self._read(data)
        except _Malformed as err:
            raise OnnxError(f"not an ONNX model ({err})") from None
        except OnnxError:
            raise  # a well-formed file with what this runner does not run: said as it is
        except (KeyError, IndexError, StopIteration, UnicodeDecodeError, ValueError, TypeError, struct.error) as err:
            raise OnnxError(f"not an ONNX model ({type(err).__name__}: {err})") from None

    def _read(self, data: bytes) -> None:
        model = _fields(data)
        graph = _fields(model[7][0]) if model.get(7) else None
        if graph is None or not graph.get(1):
            raise OnnxError("not an ONNX model (no graph nodes)")
        self.nodes: list[Node] = []
        for raw in graph[1]:
            n = _fields(raw)
            node = Node(n[4][0].decode(), [x.decode() for x in n.get(1, [])], [x.decode() for x in n.get(2, [])],
                        dict(_attribute(a) for a in n.get(5, [])))
            if node.op not in OPS:
                raise OnnxError(f"ONNX op {node.op} is not one the torch runner knows ({', '.join(OPS)})")
            self.nodes.append(node)
        import torch

        self.weights = {name: torch.from_numpy(arr) for name, arr in (_tensor(t) for t in graph.get(5, []))}
        self.device = torch.device("cpu")  # where the float weights are (`to`), and so where inputs must be
        self.input = next(x for x in (_fields(v)[1][0].decode() for v in graph.get(11, [])) if x not in self.weights)
        self.outputs = [_fields(v)[1][0].decode() for v in graph.get(12, [])]

    def to(self, device) -> "OnnxGraph":
        """The float weights moved to `device`; integer constants (Reshape's shapes) stay on the CPU, where they are
        read."""
        import torch

        self.weights = {k: v.to(device) if v.is_floating_point() else v for k, v in self.weights.items()}
        self.device = torch.device(device)
        return self

    def run(self, x) -> dict[str, Any]:
        """The graph's outputs for input x (a float tensor on the weights' device), by name."""
        import torch
        import torch.nn.functional as F

        env: dict[str, Any] = {self.input: x, **self.weights}
        for node in self.nodes:
            v = [env[name] if name else None for name in node.inputs]
            a = node.attrs
            if node.op == "Conv":
                top, left, bottom, right = a.get("pads", [0, 0, 0, 0])
                inp = v[0]
                if (top, left) != (bottom, right):
                    inp, top, left = F.pad(inp, (left, right, top, bottom)), 0, 0
                out = F.conv2d(inp, v[1], v[2] if len(v) > 2 else None, stride=a.get("strides", 1),
                               padding=(top, left), dilation=a.get("dilations", 1), groups=a.get("group", 1))
            elif node.op == "Relu":
                out = torch.relu(v[0])
            elif node.op == "Sigmoid":
                out = torch.sigmoid(v[0])
            elif node.op == "MaxPool":
                top, left, bottom, right = a.get("pads", [0, 0, 0, 0])
                if (top, left) != (bottom, right):
                    raise OnnxError("MaxPool with unequal pads: not supported")
                out = F.max_pool2d(v[0], a["kernel_shape"], a.get("strides", a["kernel_shape"]), padding=(top, left),
                                   ceil_mode=bool(a.get("ceil_mode", 0)))
            elif node.op == "Add":
                out = v[0] + v[1]
            elif node.op == "Concat":
                out = torch.cat(v, a.get("axis", 0))
            elif node.op == "Transpose":
                out = v[0].permute(*a["perm"])
            elif node.op == "Reshape":
                out = v[0].reshape(*[int(s) for s in v[1].tolist()])
            else:  # Resize: nearest, floor, asymmetric (what a YuNet graph's upsampling is) by scales or sizes
                if (a.get("mode", "nearest"), a.get("nearest_mode", "round_prefer_floor"),
                        a.get("coordinate_transformation_mode", "half_pixel")) != ("nearest", "floor", "asymmetric"):
                    raise OnnxError(f"Resize {a}: only mode nearest, nearest_mode floor, asymmetric is supported")
                scales = v[2] if len(v) > 2 and v[2] is not None and v[2].numel() else None
                if scales is not None:
                    out = F.interpolate(v[0], scale_factor=[float(s) for s in scales.tolist()[2:]], mode="nearest")
                else:
                    out = F.interpolate(v[0], size=[int(s) for s in v[3].tolist()[2:]], mode="nearest")
            env[node.outputs[0]] = out
        return {name: env[name] for name in self.outputs}

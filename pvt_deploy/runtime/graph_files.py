"""Which files an ONNX graph will read besides itself, found without onnx or onnxruntime.

onnxruntime opens a tensor's external data at the ``location`` its ``TensorProto.external_data`` names, relative to
the graph file. A model folder is untrusted input, so before a graph is handed to onnxruntime every such location
must be a file the manifest lists (and therefore checksums) inside the folder. This walks the protobuf wire format
of ``ModelProto`` into every place a tensor can live: the main graph's initializers and sparse initializers, every
node attribute (tensor, tensors, sparse tensor(s), and the subgraphs of If/Loop/Scan, recursively), the
model-local functions (their nodes and their default attributes), and the training-info graphs.
"""

from __future__ import annotations

from collections.abc import Iterator

from pvt_deploy.errors import ModelDirError

# ONNX field numbers (onnx/onnx.proto3)
_MODEL_GRAPH, _MODEL_TRAINING_INFO, _MODEL_FUNCTIONS = 7, 20, 25
_TRAINING_INITIALIZATION, _TRAINING_ALGORITHM = 1, 2
_FUNCTION_NODE, _FUNCTION_ATTRIBUTE_PROTO = 7, 11
_GRAPH_NODE, _GRAPH_INITIALIZER, _GRAPH_SPARSE_INITIALIZER = 1, 5, 15
_NODE_ATTRIBUTE = 5
_ATTR_TENSOR, _ATTR_GRAPH, _ATTR_TENSORS, _ATTR_GRAPHS, _ATTR_SPARSE, _ATTR_SPARSES = 5, 6, 10, 11, 22, 23
_TENSOR_EXTERNAL_DATA = 13
_SPARSE_VALUES, _SPARSE_INDICES = 1, 2
_ENTRY_KEY, _ENTRY_VALUE = 1, 2
_MAX_DEPTH = 64


def _varint(data: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _fields(data: memoryview) -> Iterator[tuple[int, memoryview | None]]:
    """(field number, payload) for each field; payload only for length-delimited fields."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = _varint(data, pos)
            yield number, None
        elif wire == 1:
            pos += 8
            yield number, None
        elif wire == 5:
            pos += 4
            yield number, None
        elif wire == 2:
            length, pos = _varint(data, pos)
            if pos + length > len(data):
                raise ValueError("truncated field")
            yield number, data[pos : pos + length]
            pos += length
        else:
            raise ValueError(f"unsupported wire type {wire}")
    if pos != len(data):
        raise ValueError("truncated message")


def _tensor(data: memoryview, found: set[str]) -> None:
    for number, payload in _fields(data):
        if number == _TENSOR_EXTERNAL_DATA and payload is not None:
            entry = {n: bytes(p).decode("utf-8", "replace") for n, p in _fields(payload) if p is not None}
            if entry.get(_ENTRY_KEY) == "location":
                found.add(entry.get(_ENTRY_VALUE, ""))


def _sparse(data: memoryview, found: set[str]) -> None:
    for number, payload in _fields(data):
        if number in (_SPARSE_VALUES, _SPARSE_INDICES) and payload is not None:
            _tensor(payload, found)


def _graph(data: memoryview, found: set[str], depth: int) -> None:
    if depth > _MAX_DEPTH:
        raise ValueError("graphs nested too deeply")
    for number, payload in _fields(data):
        if payload is None:
            continue
        if number == _GRAPH_INITIALIZER:
            _tensor(payload, found)
        elif number == _GRAPH_SPARSE_INITIALIZER:
            _sparse(payload, found)
        elif number == _GRAPH_NODE:
            _node(payload, found, depth)


def _node(data: memoryview, found: set[str], depth: int) -> None:
    for number, attribute in _fields(data):
        if number == _NODE_ATTRIBUTE and attribute is not None:
            _attribute(attribute, found, depth)


def _function(data: memoryview, found: set[str]) -> None:
    """A model-local function: its nodes' attributes (a ``Constant`` holds a tensor) and its attribute defaults."""
    for number, payload in _fields(data):
        if payload is None:
            continue
        if number == _FUNCTION_NODE:
            _node(payload, found, 0)
        elif number == _FUNCTION_ATTRIBUTE_PROTO:
            _attribute(payload, found, 0)


def _training_info(data: memoryview, found: set[str]) -> None:
    for number, payload in _fields(data):
        if number in (_TRAINING_INITIALIZATION, _TRAINING_ALGORITHM) and payload is not None:
            _graph(payload, found, 0)


def _attribute(data: memoryview, found: set[str], depth: int) -> None:
    for number, payload in _fields(data):
        if payload is None:
            continue
        if number in (_ATTR_TENSOR, _ATTR_TENSORS):
            _tensor(payload, found)
        elif number in (_ATTR_GRAPH, _ATTR_GRAPHS):
            _graph(payload, found, depth + 1)
        elif number in (_ATTR_SPARSE, _ATTR_SPARSES):
            _sparse(payload, found)


def external_data_locations(model_bytes: bytes, name: str = "graph") -> set[str]:
    """Every external-data ``location`` a serialized ``ModelProto`` refers to (raises ``ModelDirError`` when the
    bytes are not a parsable ONNX model)."""
    found: set[str] = set()
    try:
        for number, payload in _fields(memoryview(model_bytes)):
            if payload is None:
                continue
            if number == _MODEL_GRAPH:
                _graph(payload, found, 0)
            elif number == _MODEL_FUNCTIONS:
                _function(payload, found)
            elif number == _MODEL_TRAINING_INFO:
                _training_info(payload, found)
    except ValueError as exc:
        raise ModelDirError(f"{name}: not a valid ONNX graph ({exc})") from None
    return found

"""Codec between numpy / torch tensors and Open Inference Protocol (KServe v2) messages.

Pure functions, no Ray. Encoding always uses ``raw_*_contents`` (little-endian,
row-major bytes, one entry per tensor). Decoding accepts raw contents or, when the
message has no raw contents at all, the typed ``contents`` fields (``fp32_contents``
etc.), and validates the message strictly; any problem raises :class:`OipError`
whose text names the offending field and value, e.g.::

    inputs[1] 'sigma': raw content has 12 bytes, expected 16 for FP32 shape [4]

Decoded arrays are always C-contiguous, little-endian, writeable copies that own
their memory (never views into protobuf-owned bytes).

Zero-size tensors (e.g. a zero batch, shape ``[0, 3, 32, 32]``) are valid OIP and are
encoded / decoded faithfully (an empty raw content entry); rejecting them is the
model's business, not the codec's.

Not supported (rejected with :class:`OipError`): ``BYTES`` (string tensors) and
``BF16`` (numpy has no bfloat16; send FP16/FP32 instead).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from mode_ray.proto.inference import grpc_predict_v2_pb2 as pb

if TYPE_CHECKING:
    import torch

    TensorLike = np.ndarray | torch.Tensor
else:
    TensorLike = Any

ParamValue = bool | int | float | str

# gRPC channel / server options of every OIP hop the router makes (a tick's call can carry many rows)
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
GRPC_MESSAGE_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]

__all__ = [
    "DATATYPES",
    "OipError",
    "ParamValue",
    "TensorLike",
    "datatype_of",
    "decode_infer_request",
    "decode_infer_response",
    "decode_parameters",
    "encode_infer_request",
    "encode_infer_response",
    "numpy_dtype",
    "requested_outputs",
]

# OIP datatype -> little-endian numpy dtype.
DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}

# (numpy kind, itemsize) -> OIP datatype.
_FROM_NUMPY: dict[tuple[str, int], str] = {(dt.kind, dt.itemsize): name for name, dt in DATATYPES.items()}

# OIP datatype -> InferTensorContents field that carries it (FP16 has none).
_TYPED_FIELD: dict[str, str] = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}
_CONTENT_FIELDS = (
    "bool_contents",
    "int_contents",
    "int64_contents",
    "uint_contents",
    "uint64_contents",
    "fp32_contents",
    "fp64_contents",
    "bytes_contents",
)


MAX_RANK = 8
MAX_ELEMENTS = 1 << 31  # per tensor (8 GiB of FP32, above gRPC's 2 GiB message limit anyway)


class OipError(ValueError):
    """An OIP message (or a tensor to encode) is malformed.

    ``field`` locates the problem (e.g. ``"inputs[1] 'sigma'"``, ``"raw_input_contents"``),
    ``message`` says what is wrong; ``str(err)`` is ``"<field>: <message>"``.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message

    def __reduce__(self) -> tuple[Any, ...]:
        # Keep (field, message) across pickling (Ray ships exceptions between processes).
        return (type(self), (self.field, self.message))


# ---------------------------------------------------------------------------------------
# dtype helpers


def numpy_dtype(datatype: str) -> np.dtype:
    """The little-endian numpy dtype of an OIP datatype; raises OipError if unsupported."""
    try:
        return DATATYPES[datatype]
    except KeyError:
        raise OipError(
            "datatype", f"unsupported datatype {datatype!r}; supported: {', '.join(DATATYPES)}"
        ) from None


def datatype_of(dtype: np.dtype | type | str) -> str:
    """The OIP datatype of a numpy dtype (any byte order); raises OipError if unsupported."""
    dt = np.dtype(dtype)
    name = _FROM_NUMPY.get((dt.kind, dt.itemsize))
    if name is None:
        raise OipError(
            "dtype",
            f"numpy dtype {dt.str!r} ({dt.name}) has no OIP datatype; supported: {', '.join(DATATYPES)}",
        )
    return name


def _as_numpy(value: TensorLike, where: str) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # torch.Tensor, without importing torch
        try:
            return value.detach().cpu().numpy()
        except TypeError as e:  # e.g. bfloat16
            raise OipError(where, f"cannot convert tensor of dtype {value.dtype} to numpy: {e}") from None
    if isinstance(value, (np.generic, int, float, bool)):
        return np.asarray(value)
    raise OipError(where, f"expected a numpy array or torch tensor, got {type(value).__name__}")


# ---------------------------------------------------------------------------------------
# parameters


def _set_parameters(target: Any, parameters: Mapping[str, ParamValue] | None, where: str) -> None:
    for key, value in (parameters or {}).items():
        param = target[key]
        if isinstance(value, (bool, np.bool_)):
            param.bool_param = bool(value)
        elif isinstance(value, (int, np.integer)):
            if -(2**63) <= value < 2**63:
                param.int64_param = int(value)
            elif 2**63 <= value < 2**64:
                param.uint64_param = int(value)
            else:
                raise OipError(f"{where}[{key!r}]", f"integer {value} does not fit int64/uint64")
        elif isinstance(value, (float, np.floating)):
            param.double_param = float(value)
        elif isinstance(value, str):
            param.string_param = value
        else:
            raise OipError(f"{where}[{key!r}]", f"unsupported parameter type {type(value).__name__}")


def decode_parameters(parameters: Mapping[str, pb.InferParameter]) -> dict[str, ParamValue]:
    """Plain-python view of an OIP ``parameters`` map (unset entries are skipped)."""
    out: dict[str, ParamValue] = {}
    for key in sorted(parameters):
        param = parameters[key]
        choice = param.WhichOneof("parameter_choice")
        if choice is not None:
            out[key] = getattr(param, choice)
    return out


def requested_outputs(req: pb.ModelInferRequest) -> list[str]:
    """Names of the outputs a request asks for (empty: all outputs)."""
    return [o.name for o in req.outputs]


# ---------------------------------------------------------------------------------------
# encoding


def _encode_tensors(
    tensors: Mapping[str, TensorLike],
    add_tensor: Any,
    raw_contents: Any,
    side: str,
) -> None:
    for index, (name, value) in enumerate(tensors.items()):
        where = f"{side}[{index}] {name!r}"
        if not isinstance(name, str) or not name:
            raise OipError(where, "tensor name must be a non-empty string")
        arr = _as_numpy(value, where)
        try:
            datatype = datatype_of(arr.dtype)
        except OipError as e:
            raise OipError(where, e.message) from None
        little = DATATYPES[datatype]
        tensor = add_tensor()
        tensor.name = name
        tensor.datatype = datatype
        tensor.shape.extend(int(d) for d in arr.shape)
        raw_contents.append(np.ascontiguousarray(arr, dtype=little).tobytes(order="C"))


def encode_infer_request(
    model_name: str,
    inputs: Mapping[str, TensorLike],
    request_id: str = "",
    outputs: Sequence[str] | None = None,
    *,
    model_version: str = "",
    parameters: Mapping[str, ParamValue] | None = None,
) -> pb.ModelInferRequest:
    """Build a ModelInferRequest with every input in ``raw_input_contents``."""
    req = pb.ModelInferRequest(model_name=model_name, model_version=model_version, id=request_id)
    _set_parameters(req.parameters, parameters, "parameters")
    _encode_tensors(inputs, req.inputs.add, req.raw_input_contents, "inputs")
    for name in outputs or ():
        req.outputs.add(name=name)
    return req


def encode_infer_response(
    model_name: str,
    model_version: str,
    outputs: Mapping[str, TensorLike],
    request_id: str,
    *,
    parameters: Mapping[str, ParamValue] | None = None,
) -> pb.ModelInferResponse:
    """Build a ModelInferResponse with every output in ``raw_output_contents``."""
    resp = pb.ModelInferResponse(model_name=model_name, model_version=model_version, id=request_id)
    _set_parameters(resp.parameters, parameters, "parameters")
    _encode_tensors(outputs, resp.outputs.add, resp.raw_output_contents, "outputs")
    return resp


# ---------------------------------------------------------------------------------------
# decoding


def _shape_list(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _typed_contents(tensor: Any, datatype: str, shape: list[int], where: str) -> np.ndarray:
    contents = tensor.contents
    field = _TYPED_FIELD.get(datatype)
    if field is None:
        raise OipError(where, f"datatype {datatype} has no typed contents field; send it in raw contents")
    stray = [f for f in _CONTENT_FIELDS if f != field and len(getattr(contents, f))]
    if stray:
        raise OipError(where, f"{datatype} tensor must use contents.{field}, but {', '.join(stray)} is set")
    values = getattr(contents, field)
    count = math.prod(shape)
    if len(values) != count:
        raise OipError(
            where,
            f"contents.{field} has {len(values)} elements, expected {count} for {datatype} shape "
            f"{_shape_list(shape)}",
        )
    dtype = DATATYPES[datatype]
    wide = np.array(values, dtype=np.float64 if dtype.kind == "f" else None)
    if dtype.kind in "iu" and wide.size:
        info = np.iinfo(dtype)
        lo, hi = int(wide.min()), int(wide.max())
        if lo < info.min or hi > info.max:
            bad = lo if lo < info.min else hi
            raise OipError(where, f"contents.{field} value {bad} out of range for {datatype}")
    return np.array(wide.reshape(shape), dtype=dtype, order="C", copy=True)


def _decode_tensors(
    tensors: Sequence[Any], raw_contents: Sequence[bytes], side: str, raw_name: str
) -> dict[str, np.ndarray]:
    if raw_contents and len(raw_contents) != len(tensors):
        raise OipError(
            raw_name,
            f"has {len(raw_contents)} entries, expected one per {side[:-1]} ({len(tensors)})",
        )
    out: dict[str, np.ndarray] = {}
    for index, tensor in enumerate(tensors):
        name = tensor.name
        where = f"{side}[{index}] {name!r}"
        if not name:
            raise OipError(where, "tensor name is empty")
        if name in out:
            raise OipError(where, f"duplicate tensor name {name!r}")
        if tensor.datatype not in DATATYPES:
            raise OipError(
                where, f"unsupported datatype {tensor.datatype!r}; supported: {', '.join(DATATYPES)}"
            )
        shape = [int(d) for d in tensor.shape]
        if any(d < 0 for d in shape):
            raise OipError(where, f"shape {_shape_list(shape)} has a negative dimension")
        # an empty tensor's other dimensions count too: numpy refuses [2^31, 2^31, 0] ("array is too big")
        if len(shape) > MAX_RANK or math.prod(d for d in shape if d) > MAX_ELEMENTS:
            raise OipError(
                where,
                f"shape {_shape_list(shape)[:120]} is beyond this codec's limits (rank <= {MAX_RANK}, at most "
                f"{MAX_ELEMENTS} elements; of an empty tensor, the product of its non-zero dimensions)",
            )
        dtype = DATATYPES[tensor.datatype]
        if raw_contents:
            if tensor.HasField("contents") and any(len(getattr(tensor.contents, f)) for f in _CONTENT_FIELDS):
                raise OipError(where, f"contents must be empty when {raw_name} is used")
            raw = raw_contents[index]
            expected = math.prod(shape) * dtype.itemsize
            if len(raw) != expected:
                raise OipError(
                    where,
                    f"raw content has {len(raw)} bytes, expected {expected} for {tensor.datatype} "
                    f"shape {_shape_list(shape)}",
                )
            flat = np.frombuffer(raw, dtype=dtype)
            if dtype.kind == "b" and flat.size and flat.view(np.uint8).max() > 1:
                raise OipError(where, "BOOL raw content has bytes other than 0 and 1")
            arr = np.array(flat.reshape(shape), dtype=dtype, order="C", copy=True)
        else:
            arr = _typed_contents(tensor, tensor.datatype, shape, where)
        out[name] = arr
    return out


def decode_infer_request(req: pb.ModelInferRequest) -> dict[str, np.ndarray]:
    """Validate a ModelInferRequest and return its inputs by name, in request order."""
    return _decode_tensors(req.inputs, req.raw_input_contents, "inputs", "raw_input_contents")


def decode_infer_response(resp: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    """Validate a ModelInferResponse and return its outputs by name, in response order."""
    return _decode_tensors(resp.outputs, resp.raw_output_contents, "outputs", "raw_output_contents")

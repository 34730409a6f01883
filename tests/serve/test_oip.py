"""Tests for the OIP tensor codec (mode_ray.serve.oip) and the generated proto package."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mode_ray.proto.inference import grpc_predict_v2_pb2 as pb
from mode_ray.serve.oip import (
    OipError,
    datatype_of,
    decode_infer_request,
    decode_infer_response,
    decode_parameters,
    encode_infer_request,
    encode_infer_response,
    numpy_dtype,
    requested_outputs,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


def _wire(msg):
    """Serialize and parse again, as a real gRPC hop would."""
    return type(msg).FromString(msg.SerializeToString())


def _assert_owned_le_contiguous(arr: np.ndarray) -> None:
    assert arr.flags.c_contiguous
    assert arr.flags.owndata
    assert arr.flags.writeable
    assert arr.dtype.byteorder in ("<", "|", "=")
    assert arr.dtype.byteorder != "=" or sys.byteorder == "little"


@pytest.mark.parametrize(
    ("dtype", "datatype"),
    [
        (np.float32, "FP32"),
        (np.float16, "FP16"),
        (np.int64, "INT64"),
        (np.float64, "FP64"),
        (np.int32, "INT32"),
        (np.uint8, "UINT8"),
        (np.bool_, "BOOL"),
    ],
)
def test_request_round_trip(dtype, datatype):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((2, 3, 4)) * 10).astype(dtype)
    sigma = np.array([0.5, 1.0], dtype=np.float32)
    req = _wire(encode_infer_request("expert-a", {"x": x, "sigma": sigma}, request_id="r1", outputs=["eps"]))

    assert req.model_name == "expert-a" and req.id == "r1"
    assert [t.datatype for t in req.inputs] == [datatype, "FP32"]
    assert list(req.inputs[0].shape) == [2, 3, 4]
    assert requested_outputs(req) == ["eps"]

    got = decode_infer_request(req)
    assert list(got) == ["x", "sigma"]
    assert got["x"].dtype == np.dtype(dtype) and got["x"].shape == (2, 3, 4)
    np.testing.assert_array_equal(got["x"], x)
    np.testing.assert_array_equal(got["sigma"], sigma)
    for arr in got.values():
        _assert_owned_le_contiguous(arr)


def test_response_round_trip():
    eps = np.linspace(-1, 1, 24, dtype=np.float32).reshape(2, 3, 4)
    resp = _wire(encode_infer_response("expert-a", "3", {"eps": eps}, "r9", parameters={"steps": 7}))
    assert (resp.model_name, resp.model_version, resp.id) == ("expert-a", "3", "r9")
    assert decode_parameters(resp.parameters) == {"steps": 7}
    got = decode_infer_response(resp)
    np.testing.assert_array_equal(got["eps"], eps)
    _assert_owned_le_contiguous(got["eps"])


def test_decoded_array_is_not_a_view_of_the_message():
    req = encode_infer_request("m", {"x": np.arange(4, dtype=np.float32)})
    got = decode_infer_request(req)["x"]
    got[0] = 42.0  # writeable, and must not touch the message
    del req
    assert got.tolist() == [42.0, 1.0, 2.0, 3.0]


def test_encode_normalises_layout_and_byte_order():
    base = np.arange(12, dtype=">f4").reshape(3, 4)  # big-endian
    strided = base.T  # non-contiguous
    req = encode_infer_request("m", {"x": strided})
    assert req.inputs[0].datatype == "FP32"
    assert req.raw_input_contents[0] == np.ascontiguousarray(strided, dtype="<f4").tobytes()
    np.testing.assert_array_equal(decode_infer_request(req)["x"], strided)


def test_encode_torch_tensor():
    torch = pytest.importorskip("torch")
    t = torch.arange(6, dtype=torch.float16).reshape(2, 3).t()
    req = encode_infer_request("m", {"x": t})
    assert req.inputs[0].datatype == "FP16"
    np.testing.assert_array_equal(decode_infer_request(req)["x"], t.numpy())
    with pytest.raises(OipError, match="inputs\\[0\\] 'b'.*bfloat16"):
        encode_infer_request("m", {"b": torch.zeros(2, dtype=torch.bfloat16)})


def test_zero_batch_is_handled_deliberately():
    # Zero-size tensors are valid OIP: they round-trip with an empty raw entry and their shape.
    x = np.zeros((0, 3, 8, 8), dtype=np.float32)
    req = _wire(encode_infer_request("m", {"x": x, "t": np.zeros(0, np.int64)}))
    assert list(req.raw_input_contents) == [b"", b""]
    got = decode_infer_request(req)
    assert got["x"].shape == (0, 3, 8, 8) and got["x"].dtype == np.float32
    assert got["t"].shape == (0,)


def test_scalar_tensor():
    got = decode_infer_request(encode_infer_request("m", {"s": np.float32(2.5)}))
    assert got["s"].shape == () and got["s"] == 2.5


def test_typed_contents_are_accepted_when_no_raw():
    req = pb.ModelInferRequest(model_name="m")
    t = req.inputs.add(name="sigma", datatype="FP32", shape=[2, 2])
    t.contents.fp32_contents.extend([1, 2, 3, 4])
    t = req.inputs.add(name="labels", datatype="INT64", shape=[2])
    t.contents.int64_contents.extend([7, -1])
    t = req.inputs.add(name="mask", datatype="UINT8", shape=[3])
    t.contents.uint_contents.extend([0, 1, 255])
    got = decode_infer_request(_wire(req))
    assert got["sigma"].dtype == np.float32 and got["sigma"].tolist() == [[1, 2], [3, 4]]
    assert got["labels"].dtype == np.int64 and got["labels"].tolist() == [7, -1]
    assert got["mask"].dtype == np.uint8 and got["mask"].tolist() == [0, 1, 255]
    for arr in got.values():
        _assert_owned_le_contiguous(arr)


def test_parameters_round_trip():
    params = {"flag": True, "n": -3, "big": 2**64 - 1, "scale": 7.5, "mode": "ddim"}
    req = _wire(encode_infer_request("m", {}, parameters=params))
    assert decode_parameters(req.parameters) == params
    with pytest.raises(OipError, match="parameters\\['bad'\\]"):
        encode_infer_request("m", {}, parameters={"bad": [1]})  # type: ignore[dict-item]


def test_datatype_helpers():
    assert datatype_of(np.dtype(">i8")) == "INT64"
    assert numpy_dtype("FP16") == np.dtype("<f2")
    with pytest.raises(OipError, match="'BF16'"):
        numpy_dtype("BF16")
    with pytest.raises(OipError, match="complex"):
        datatype_of(np.complex64)


def test_oip_error_is_value_error_and_pickles():
    err = OipError("inputs[0] 'x'", "boom")
    assert isinstance(err, ValueError)
    again = pickle.loads(pickle.dumps(err))
    assert (again.field, again.message, str(again)) == ("inputs[0] 'x'", "boom", "inputs[0] 'x': boom")


# ---------------------------------------------------------------------------------------
# error paths


def _two_input_request() -> pb.ModelInferRequest:
    return encode_infer_request(
        "m", {"x": np.zeros((2, 2), np.float32), "sigma": np.ones(4, np.float32)}, request_id="r"
    )


def test_error_raw_length_mismatch():
    req = _two_input_request()
    req.raw_input_contents[1] = b"\0" * 12
    with pytest.raises(OipError) as exc:
        decode_infer_request(req)
    assert str(exc.value) == "inputs[1] 'sigma': raw content has 12 bytes, expected 16 for FP32 shape [4]"
    assert exc.value.field == "inputs[1] 'sigma'"


def test_error_unknown_datatype():
    req = _two_input_request()
    req.inputs[0].datatype = "FP8"
    with pytest.raises(OipError, match=r"^inputs\[0\] 'x': unsupported datatype 'FP8'"):
        decode_infer_request(req)
    req.inputs[0].datatype = "BYTES"
    with pytest.raises(OipError, match="unsupported datatype 'BYTES'"):
        decode_infer_request(req)


def test_error_unsupported_numpy_dtype_on_encode():
    with pytest.raises(OipError, match=r"^inputs\[0\] 'names': numpy dtype '<U1'"):
        encode_infer_request("m", {"names": np.array(["a", "b"])})


def test_error_duplicate_names():
    req = _two_input_request()
    req.inputs[1].name = "x"
    with pytest.raises(OipError, match=r"^inputs\[1\] 'x': duplicate tensor name 'x'"):
        decode_infer_request(req)


def test_error_missing_raw_contents():
    req = _two_input_request()
    del req.raw_input_contents[1]
    with pytest.raises(OipError, match=r"^raw_input_contents: has 1 entries, expected one per input \(2\)"):
        decode_infer_request(req)


def test_error_no_data_at_all():
    req = _two_input_request()
    del req.raw_input_contents[:]
    with pytest.raises(
        OipError, match=r"^inputs\[0\] 'x': contents.fp32_contents has 0 elements, expected 4"
    ):
        decode_infer_request(req)


def test_error_mixing_raw_and_typed_contents():
    req = _two_input_request()
    req.inputs[0].contents.fp32_contents.extend([1, 2, 3, 4])
    with pytest.raises(OipError, match="contents must be empty when raw_input_contents is used"):
        decode_infer_request(req)


def test_error_typed_contents_wrong_field_count_and_range():
    req = pb.ModelInferRequest()
    t = req.inputs.add(name="x", datatype="FP32", shape=[2])
    t.contents.int_contents.extend([1, 2])
    with pytest.raises(OipError, match="must use contents.fp32_contents, but int_contents is set"):
        decode_infer_request(req)

    req = pb.ModelInferRequest()
    req.inputs.add(name="h", datatype="FP16", shape=[1]).contents.fp32_contents.append(1.0)
    with pytest.raises(OipError, match="FP16 has no typed contents field"):
        decode_infer_request(req)

    req = pb.ModelInferRequest()
    req.inputs.add(name="b", datatype="INT8", shape=[2]).contents.int_contents.extend([1, 300])
    with pytest.raises(OipError, match=r"^inputs\[0\] 'b': contents.int_contents value 300 out of range"):
        decode_infer_request(req)


def test_error_negative_dim_and_empty_name():
    req = _two_input_request()
    req.inputs[1].shape[0] = -1
    with pytest.raises(OipError, match=r"shape \[-1\] has a negative dimension"):
        decode_infer_request(req)
    req = _two_input_request()
    req.inputs[0].name = ""
    with pytest.raises(OipError, match=r"^inputs\[0\] '': tensor name is empty"):
        decode_infer_request(req)


def test_error_bad_bool_bytes():
    req = encode_infer_request("m", {"mask": np.array([True, False])})
    req.raw_input_contents[0] = b"\x01\x07"
    with pytest.raises(OipError, match="BOOL raw content"):
        decode_infer_request(req)


def test_response_errors_name_outputs():
    resp = encode_infer_response("m", "1", {"eps": np.zeros(3, np.float32)}, "r")
    resp.raw_output_contents[0] = b"\0" * 4
    with pytest.raises(OipError, match=r"^outputs\[0\] 'eps': raw content has 4 bytes, expected 12"):
        decode_infer_response(resp)
    resp.raw_output_contents.append(b"")
    with pytest.raises(OipError, match=r"^raw_output_contents: has 2 entries, expected one per output \(1\)"):
        decode_infer_response(resp)


# ---------------------------------------------------------------------------------------
# generated code


def test_generated_protos_are_up_to_date():
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "gen_protos.py"), "--check"],
        capture_output=True,
        check=False,
        text=True,
        cwd=REPO_ROOT,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_generated_messages_pickle_by_absolute_module():
    # Ray pickles request protos between the Serve proxy and replicas.
    from mode_ray.proto.mode_ray.v1 import generation_pb2

    assert pb.ModelInferRequest.__module__ == "mode_ray.proto.inference.grpc_predict_v2_pb2"
    msg = generation_pb2.GenerateRequest(prompt="a cat", seed=3, experts=["a"])
    again = pickle.loads(pickle.dumps(msg))
    assert again == msg and again.HasField("seed") and not again.HasField("top_k")


@pytest.mark.parametrize(
    "shape",
    [[0, 2**40, 2**40], [2**31, 2**31, 0, 28], [2**32], [1] * 9, [2**20, 2**20]],
    ids=["empty-but-huge", "empty-dims-at-the-limit", "one-huge-dim", "rank-9", "too-many-elements"],
)
def test_error_shapes_beyond_the_codec_limits(shape) -> None:  # noqa: ANN001
    """numpy's own 'array is too big' must never escape (it carried a traceback to the client)."""
    req = pb.ModelInferRequest()
    req.inputs.add(name="x", datatype="FP32", shape=shape)
    req.raw_input_contents.append(b"")
    with pytest.raises(OipError, match=r"^inputs\[0\] 'x': shape .* is beyond this codec's limits"):
        decode_infer_request(req)

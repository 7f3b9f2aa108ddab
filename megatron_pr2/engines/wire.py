# Wire encodings of expert ids used by inference engines, decoded and encoded without trusting
# the payload: numpy arrays / torch tensors / nested lists, base64 of a `.npy` file (vLLM's
# OpenAI-compatible server), and base64 of a flat little-endian buffer (SGLang's meta_info).
#
# Every decoder returns (int64 numpy array, wire dtype) so the caller can check ids against the
# dtype's range; every malformed input raises ValueError naming the field, what was expected
# and what was given.

import base64
import io
from typing import Any, Tuple, Union

import numpy as np
import torch

__all__ = [
    "decode_array",
    "decode_npy_base64",
    "decode_flat_base64",
    "encode_npy_base64",
    "encode_flat_base64",
    "wire_dtype",
]

Payload = Union[str, bytes, bytearray]

_TORCH_TO_NUMPY = {
    torch.uint8: np.uint8,
    torch.int8: np.int8,
    torch.int16: np.int16,
    torch.uint16: np.uint16,
    torch.int32: np.int32,
    torch.int64: np.int64,
}
_NPY_MAGIC = b"\x93NUMPY"


def wire_dtype(dtype: Any, where: str) -> np.dtype:
    """numpy integer dtype from a torch dtype, numpy dtype or name ('int32', '<u2', ...)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _TORCH_TO_NUMPY:
            raise ValueError(f"{where}: dtype {dtype} is not an integer dtype")
        return np.dtype(_TORCH_TO_NUMPY[dtype])
    try:
        out = np.dtype(dtype)
    except TypeError as error:
        raise ValueError(f"{where}: dtype {dtype!r} is not a numpy/torch dtype") from error
    if out.kind not in "iu":
        raise ValueError(f"{where}: dtype expected an integer dtype, given {out}")
    return out


def _b64(payload: Payload, where: str) -> bytes:
    if isinstance(payload, str):
        payload = payload.encode("ascii", errors="replace")
    try:
        return base64.b64decode(bytes(payload), validate=True)
    except (ValueError, TypeError) as error:
        raise ValueError(f"{where}: not valid base64 ({error})") from error


def decode_array(value: Any, where: str) -> Tuple[np.ndarray, np.dtype]:
    """An in-process route array (numpy, torch, nested list) as (int64 array, wire dtype)."""
    if isinstance(value, torch.Tensor):
        if value.dtype not in _TORCH_TO_NUMPY:
            raise ValueError(f"{where}: dtype expected an integer tensor, given {value.dtype}")
        return value.detach().to("cpu", torch.int64).numpy(), np.dtype(_TORCH_TO_NUMPY[value.dtype])
    array = np.asarray(value)
    if array.size == 0 and array.dtype.kind == "f":
        array = array.astype(np.int64)  # an empty nested list
    if array.dtype.kind not in "iu":
        raise ValueError(f"{where}: dtype expected an integer array, given {array.dtype}")
    return array.astype(np.int64), array.dtype


def decode_npy_base64(payload: Payload, where: str) -> Tuple[np.ndarray, np.dtype]:
    """Base64 of a `.npy` file (vLLM's HTTP `routed_experts`) as (int64 array, wire dtype).

    The header is parsed with numpy.lib.format (magic, version, descr, fortran_order, shape);
    only integer dtypes are accepted (never pickled objects), and the data must be exactly
    prod(shape) * itemsize bytes. The byte order is the one the header declares.
    """
    raw = _b64(payload, where)
    if not raw.startswith(_NPY_MAGIC):
        raise ValueError(
            f"{where}: npy magic expected {_NPY_MAGIC!r} (base64 of a .npy file), given "
            f"{raw[:6]!r}; flat buffers (SGLang) need routes_from_sglang"
        )
    stream = io.BytesIO(raw)
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(stream)
        elif version == (2, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(stream)
        else:
            raise ValueError(f"npy version expected 1.0 or 2.0, given {version}")
    except ValueError as error:
        raise ValueError(f"{where}: malformed .npy header: {error}") from error
    if dtype.kind not in "iu":
        raise ValueError(f"{where}: npy dtype expected an integer dtype, given {dtype.str}")
    data = raw[stream.tell() :]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(
            f"{where}: npy data size expected {expected} bytes for shape {tuple(shape)} "
            f"{dtype.str}, given {len(data)}"
        )
    array = np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran_order else "C")
    return array.astype(np.int64), dtype.newbyteorder("=")


def decode_flat_base64(payload: Payload, dtype: Any, where: str) -> Tuple[np.ndarray, np.dtype]:
    """Base64 of a flat little-endian buffer (SGLang's meta_info["routed_experts"]) as a 1-D
    int64 array; the byte order is little-endian whatever the host's."""
    wire = wire_dtype(dtype, where).newbyteorder("<")
    raw = _b64(payload, where)
    if raw.startswith(_NPY_MAGIC):
        raise ValueError(
            f"{where}: expected a flat {wire.name} buffer, given a .npy file (vLLM's HTTP format: "
            "use routes_from_vllm)"
        )
    if len(raw) % wire.itemsize:
        raise ValueError(
            f"{where}: byte count expected a multiple of {wire.itemsize} ({wire.name}), given "
            f"{len(raw)}"
        )
    return np.frombuffer(raw, dtype=wire).astype(np.int64), wire.newbyteorder("=")


def encode_npy_base64(array: np.ndarray) -> str:
    """Base64 of the `.npy` file numpy.save writes for `array` (vLLM's HTTP encoding)."""
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def encode_flat_base64(array: np.ndarray, dtype: Any = "<i4") -> str:
    """Base64 of the flat C-order little-endian buffer (SGLang's encoding, int32 by default)."""
    wire = np.dtype(dtype).newbyteorder("<")
    return base64.b64encode(np.ascontiguousarray(array, dtype=wire).tobytes()).decode("ascii")

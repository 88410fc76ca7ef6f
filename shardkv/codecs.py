"""Codecs: how a client turns Python keys and values into the bytes the store keeps, and back.

`shardkv.open(dir, key_codec="str", value_codec="json")`, as users know it from diskcache and
shelve. Built in:

| name | Python type | bytes stored |
| --- | --- | --- |
| `"bytes"` (default) | bytes-like (bytes, bytearray, memoryview); reads give `bytes` | as given |
| `"str"` | `str` | UTF-8 (ordered scans then follow code point order, which is UTF-8 byte order) |
| `"pickle"` | any picklable object | `pickle.dumps(obj, protocol=5)`; never open a store you do not trust with it |
| `"json"` | what `json.dumps` takes | compact UTF-8 JSON, keys of objects sorted (so equal dicts give equal keys) |

Any object with `encode(obj) -> bytes` and `decode(data: bytes) -> obj` methods is a codec too.
Keys are compared, hashed and ordered by their encoded bytes. A value that a codec cannot encode
is a TypeError or ValueError before anything is sent.
"""

from __future__ import annotations

import json
import pickle
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Codec(Protocol):
    """Turns objects into bytes and back; `decode(encode(x)) == x`."""

    def encode(self, obj: Any) -> bytes:
        """The bytes stored for `obj` (TypeError or ValueError if it cannot be stored)."""
        ...

    def decode(self, data: bytes) -> Any:
        """The object stored as `data`."""
        ...


class StrCodec:
    """`str` as UTF-8."""

    name = "str"

    def encode(self, obj: Any) -> bytes:
        """UTF-8 of a str; TypeError for anything else (bytes included: say which you mean)."""
        if type(obj) is not str:
            if not isinstance(obj, str):
                raise TypeError(f"this store's codec is 'str': expected str, not {type(obj).__name__}")
        return obj.encode("utf-8", "surrogatepass")

    def decode(self, data: bytes) -> str:
        """The str whose UTF-8 is `data`."""
        return data.decode("utf-8", "surrogatepass")


class PickleCodec:
    """Any picklable object (protocol 5). Unpickling runs code: only for stores you trust."""

    name = "pickle"

    def encode(self, obj: Any) -> bytes:
        """`pickle.dumps(obj, protocol=5)`; TypeError if it cannot be pickled."""
        try:
            return pickle.dumps(obj, protocol=5)
        except (pickle.PicklingError, AttributeError) as exc:
            raise TypeError(f"cannot pickle {type(obj).__name__}: {exc}") from None

    def decode(self, data: bytes) -> Any:
        """`pickle.loads(data)`."""
        return pickle.loads(data)


class JsonCodec:
    """JSON values (dict, list, str, int, float, bool, None), compact UTF-8."""

    name = "json"

    def encode(self, obj: Any) -> bytes:
        """Compact JSON with sorted object keys; TypeError if `obj` is not JSON-serialisable."""
        return json.dumps(obj, separators=(",", ":"), sort_keys=True, ensure_ascii=False, allow_nan=False).encode("utf-8")

    def decode(self, data: bytes) -> Any:
        """`json.loads(data)`."""
        return json.loads(data)


BUILT_IN = {"str": StrCodec(), "pickle": PickleCodec(), "json": JsonCodec()}
CODEC_NAMES = ("bytes", *BUILT_IN)


def resolve(codec: Any, role: str) -> Codec | None:
    """The codec named or given as `codec` for `role` ("key_codec" or "value_codec"); None
    for "bytes", which clients treat as no codec at all (their fast paths stay as they are)."""
    if codec is None or codec == "bytes":
        return None
    if isinstance(codec, str):
        try:
            return BUILT_IN[codec]
        except KeyError:
            raise ValueError(f"{role} must be one of {', '.join(CODEC_NAMES)} or an object with encode() and decode(), not {codec!r}") from None
    if not (callable(getattr(codec, "encode", None)) and callable(getattr(codec, "decode", None))):
        raise TypeError(f"{role} must be a codec name or an object with encode() and decode(), not {type(codec).__name__}")
    return codec

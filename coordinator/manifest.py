"""The store's MANIFEST (docs/FORMAT.md, "Store directory and MANIFEST")."""

from __future__ import annotations

import json
import os

from crc32c import crc32c

from shardkv.errors import CorruptionError
from shardkv.wal import fileio

MANIFEST = "MANIFEST"
VERSION = 1


def _canonical(fields: dict) -> bytes:
    return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()


def read_manifest(directory: str) -> dict | None:
    """The manifest of the store in `directory`, or None if there is none yet."""
    path = os.path.join(directory, MANIFEST)
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read())
    except FileNotFoundError:
        return None
    except ValueError as exc:
        raise CorruptionError(f"{path}: not valid JSON ({exc}) at offset 0") from None
    if not isinstance(data, dict) or "crc" not in data:
        raise CorruptionError(f"{path}: no crc at offset 0")
    crc = data.pop("crc")
    if crc32c(_canonical(data)) != crc:
        raise CorruptionError(f"{path}: checksum mismatch at offset 0")
    if data.get("format") != "shardkv" or data.get("version") != VERSION:
        raise CorruptionError(f"{path}: unsupported format {data.get('format')!r} version {data.get('version')!r} at offset 0")
    if not isinstance(data.get("shards"), int) or not 1 <= data["shards"] <= 1024:
        raise CorruptionError(f"{path}: bad shard count {data.get('shards')!r} at offset 0")
    return data


def write_manifest(directory: str, shards: int) -> dict:
    """Create the manifest of a new store with `shards` shards."""
    fields = {"format": "shardkv", "shards": shards, "version": VERSION}
    fields_with_crc = dict(fields, crc=crc32c(_canonical(fields)))
    fileio.write_file_atomically(directory, MANIFEST, json.dumps(fields_with_crc, sort_keys=True).encode() + b"\n")
    return fields


def resolve_shards(directory: str, requested: int | None) -> tuple[int, bool]:
    """(shard count, whether the manifest exists). Raises ValueError on a mismatch."""
    manifest = read_manifest(directory)
    if manifest is None:
        return (requested or os.cpu_count() or 1), False
    if requested is not None and requested != manifest["shards"]:
        raise ValueError(f"{directory} was created with {manifest['shards']} shards, not {requested}; shards is fixed at creation")
    return manifest["shards"], True


def shard_directory(directory: str, shard: int) -> str:
    """Where shard `shard` of the store in `directory` keeps its files."""
    return os.path.join(directory, f"shard-{shard:03d}")

"""docs/IPC.md against shardkv/ipc: the tables and the constants must agree."""

import re
from pathlib import Path

import pytest

from shardkv.ipc import layout
from shardkv.ipc import messages as m

DOC = (Path(__file__).resolve().parent.parent / "docs" / "IPC.md").read_text()


def table_after(heading_text: str) -> list[list[str]]:
    """Rows (cells) of the first markdown table after the line containing `heading_text`."""
    lines = DOC[DOC.index(heading_text) :].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        if not set(cells[0]) <= set("-: "):
            rows.append(cells)
    return rows[1:]


def sizes(rows) -> list[tuple[int, int]]:
    return [(int(r[0]), int(r[1])) for r in rows]


def contiguous_total(rows) -> int:
    position = 0
    for offset, size in sizes(rows):
        assert offset == position, f"gap or overlap at offset {offset}"
        position += size
    return position


@pytest.mark.unit
def test_control_header_matches_doc():
    rows = table_after("## Control block")
    assert contiguous_total(rows) == layout.CTL_HEADER.size == 64
    assert f"`{layout.CTL_MAGIC.decode().strip()}\\n`" in rows[0][3]
    assert layout.CTL_STATE_OFFSET == next(int(r[0]) for r in rows if r[2] == "state")
    assert layout.CTL_MAP_VERSION_OFFSET == next(int(r[0]) for r in rows if r[2] == "map_version")


@pytest.mark.unit
def test_process_entry_matches_doc():
    rows = table_after("**Process table**")
    assert contiguous_total(rows) == layout.PROC_DTYPE.itemsize == 32
    for offset, size, name in ((int(r[0]), int(r[1]), r[2]) for r in rows):
        field_dtype, field_offset = layout.PROC_DTYPE.fields[name]
        assert (field_offset, field_dtype.itemsize) == (offset, size), name


@pytest.mark.unit
def test_process_states_match_doc():
    row = next(r for r in table_after("**Process table**") if r[2] == "state")
    for code, name in layout.PROC_STATE_NAMES.items():
        assert f"{code} {name}" in row[3]


@pytest.mark.unit
def test_slot_header_matches_doc():
    rows = table_after("## Ring")
    assert contiguous_total(rows) == layout.SLOT_HEADER_SIZE == 64
    assert layout.SLOT_STATE.size + layout.SLOT_FIELDS.size <= 64
    offsets = {r[2]: int(r[0]) for r in rows}
    assert offsets["flags"] == 4 and offsets["request_id"] == 8 and offsets["frame_len"] == 16 and offsets["total_len"] == 24


@pytest.mark.unit
def test_lease_entry_size_matches_doc():
    assert "16 bytes" in DOC[DOC.index("**Lease table**") :].splitlines()[0]
    assert layout.LEASE_DTYPE.itemsize == 16


@pytest.mark.unit
def test_op_codes_match_doc():
    rows = table_after("## Messages")
    documented = {r[0]: int(r[1]) for r in rows}
    assert documented == {name: code for code, name in m.OP_NAMES.items()}


@pytest.mark.unit
def test_key_slot_is_top_bits_of_crc32c():
    from crc32c import crc32c

    assert "crc32c(key) >> 20" in DOC
    for key in (b"a", b"key001", bytes(range(256))):
        assert layout.key_slot(key) == crc32c(key) >> 20 < layout.HASH_SLOTS


@pytest.mark.engine
def test_names_are_prefixed_and_distinct(tmp_path):
    a = layout.names(str(tmp_path), "0000abcd", 3, 4)
    b = layout.names(str(tmp_path / "x"), "0000abcd", 3, 4)
    all_a = [a["control"], *a["rings"], *a["wake"], *a["done"]]
    assert len(set(all_a)) == len(all_a) == 1 + 3 + 3 + 4
    assert all(n.startswith(layout.name_prefix(str(tmp_path)) + "-0000abcd-") for n in all_a)
    assert re.fullmatch(r"/shardkv-[0-9a-f]{12}", layout.name_prefix(str(tmp_path)))
    assert a["control"] != b["control"]


@pytest.mark.unit
def test_list_decoders_reject_malformed_input_and_roundtrip():
    import pytest

    values = [b"a", None, b"", b"x" * 300, None]
    assert m.decode_optionals(m.encode_optionals(values)) == values
    keys = [b"k1", b"", b"k" * 1000]
    assert m.decode_blob_list(b"\x07\x00" + m.blob_list(keys), 2) == keys
    good = m.encode_optionals(values)
    for bad in (b"", b"\x01\x00\x00", good[:-1], good + b"\x00", b"\x01\x00\x00\x00\x07", b"\xff\xff\xff\xff"):
        with pytest.raises(m.MessageError):
            m.decode_optionals(bad)
    good = m.blob_list(keys)
    for bad in (good[:-1], good + b"\x00", b"\x05\x00\x00\x00", b"\x01\x00\x00\x00\xff\x00\x00\x00"):
        with pytest.raises(m.MessageError):
            m.decode_blob_list(bad, 0)


@pytest.mark.engine
def test_counting_held_leases_never_takes_a_free_one(tmp_path):
    """The supervisor counts live leases often; a client taking a free lease meanwhile must
    never find it locked by the counting (it would skip to another lease)."""
    import fcntl
    import os
    import threading

    from shardkv.coordinator.runfiles import count_held

    paths = [str(tmp_path / f"lease-{i}.lock") for i in range(8)]
    for path in paths:
        open(path, "w").close()
    holder = os.open(paths[3], os.O_RDWR)
    fcntl.flock(holder, fcntl.LOCK_EX)
    stop = threading.Event()
    counts = []

    def count():
        while not stop.is_set():
            counts.append(count_held(paths))

    counter = threading.Thread(target=count)
    counter.start()
    refused = 0
    try:
        for _ in range(3000):
            fd = os.open(paths[0], os.O_RDWR)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                refused += 1
            finally:
                os.close(fd)
    finally:
        stop.set()
        counter.join()
        os.close(holder)
    assert refused == 0
    assert counts and set(counts) <= {1, 2}  # lease 3, and lease 0 while this thread holds it

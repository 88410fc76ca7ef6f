"""docs/FORMAT.md and shardkv.wal.format must describe the same bytes.

The tables of the spec are parsed and checked against the struct layouts: offsets contiguous from
0, sizes adding up to the struct size (+4 for a trailing crc row), and the size of each struct
field, in order, equal to the size of each table row. Changing a struct without the doc (or the
doc without the struct) fails here.
"""

from __future__ import annotations

import codecs
import re
import struct
from pathlib import Path

import pytest

from shardkv.wal import format as fmt

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "FORMAT.md"
FORMAT_SOURCE = ROOT / "wal" / "format.py"


# -- parsing the markdown ----------------------------------------------------------------------
def sections(text: str) -> dict[str, str]:
    """Map each '## ' heading of the page to the text under it."""
    result: dict[str, str] = {}
    current = None
    lines: list[str] = []
    for line in text.splitlines():
        if line.startswith("## "):
            if current is not None:
                result[current] = "\n".join(lines)
            current, lines = line[3:].strip(), []
        elif current is not None:
            lines.append(line)
    if current is not None:
        result[current] = "\n".join(lines)
    return result


def tables(section: str) -> list[list[dict[str, str]]]:
    """Return the markdown tables of a section, each a list of rows keyed by column name."""
    found = []
    block: list[str] = []
    for line in section.splitlines() + [""]:
        if line.strip().startswith("|"):
            block.append(line.strip())
            continue
        if block:
            cells = [[c.strip() for c in row.strip("|").split("|")] for row in block]
            header, separator, body = cells[0], cells[1], cells[2:]
            assert all(set(c) <= set("-: ") for c in separator), f"not a table separator: {block[1]}"
            found.append([dict(zip(header, row, strict=True)) for row in body])
            block = []
    return found


def layout_table(section_name: str, index: int = 0) -> list[dict[str, str]]:
    table = tables(SECTIONS[section_name])[index]
    assert table and list(table[0])[:3] == ["offset", "size", "field"], f"{section_name}: not a layout table"
    return table


SECTIONS = sections(DOC.read_text())


# -- struct field sizes ------------------------------------------------------------------------
_FORMAT_ITEM = re.compile(r"(\d*)([xcbB?hHiIlLqQnNefdspP])")


def struct_field_sizes(format_string: str) -> list[int]:
    """Sizes of the fields of a struct format, in order; 'Ns' / 'Nx' / 'Np' count as one field of N bytes."""
    body = format_string.strip()
    assert body[:1] in "<>!=", f"{format_string!r}: layouts must use a standard (unpadded) byte order"
    body = re.sub(r"\s+", "", body[1:])
    sizes = []
    position = 0
    for match in _FORMAT_ITEM.finditer(body):
        assert match.start() == position, f"cannot parse struct format {format_string!r}"
        position = match.end()
        count = int(match.group(1)) if match.group(1) else 1
        char = match.group(2)
        if char in "spx":
            sizes.append(count)
        else:
            sizes.extend([struct.calcsize("<" + char)] * count)
    assert position == len(body), f"cannot parse struct format {format_string!r}"
    assert sum(sizes) == struct.calcsize(format_string)
    return sizes


def layout_problems(rows: list[dict[str, str]], layout: struct.Struct, trailing_crc: bool) -> list[str]:
    """Everything in which a layout table disagrees with `layout` (empty if they agree)."""
    problems = []
    expected_offset = 0
    for row in rows:
        offset, size = int(row["offset"]), int(row["size"])
        if offset != expected_offset:
            problems.append(f"field {row['field']!r} at offset {offset}, expected {expected_offset}")
        if size <= 0:
            problems.append(f"field {row['field']!r} has size {size}")
        expected_offset = offset + size
    total = sum(int(row["size"]) for row in rows)
    wanted = layout.size + (4 if trailing_crc else 0)
    if total != wanted:
        problems.append(f"table sizes add up to {total}, struct {layout.format!r} gives {wanted}")
    struct_rows = rows
    if trailing_crc:
        last = rows[-1]
        if int(last["size"]) != 4 or "crc" not in last["field"]:
            problems.append(f"last row {last['field']!r} is not a 4-byte crc")
        struct_rows = rows[:-1]
    table_sizes = [int(row["size"]) for row in struct_rows]
    field_sizes = struct_field_sizes(layout.format)
    if table_sizes != field_sizes:
        problems.append(f"table field sizes {table_sizes} != struct {layout.format!r} field sizes {field_sizes}")
    return problems


# (section, table index, struct, has a trailing crc row)
LAYOUTS = {
    "segment header": ("Segment file", 0, fmt.SEGMENT_HEADER, True),
    "record header": ("Record", 0, fmt.RECORD_HEADER, False),
    "hint header": ("Hint file", 0, fmt.HINT_HEADER, False),
    "hint entry": ("Hint file", 1, fmt.HINT_ENTRY, False),
    "compaction header": ("Compaction commit record", 0, fmt.COMPACTION_HEADER, False),
    "prepare entry": ("PREPARE value", 0, fmt.PREPARE_ENTRY, False),
    "synced slot": ("SYNCED file", 0, fmt.SYNCED_SLOT, True),
}


def test_doc_has_the_expected_sections_and_tables():
    for name in ("Segment file", "Record", "Hint file", "Compaction commit record", "PREPARE value", "Decision log", "SYNCED file"):
        assert name in SECTIONS, f"docs/FORMAT.md lost its '## {name}' section"
    assert len(tables(SECTIONS["Hint file"])) == 2, "the hint file section must have a header table and an entry table"


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_table_matches_struct(name):
    section, index, layout, trailing_crc = LAYOUTS[name]
    problems = layout_problems(layout_table(section, index), layout, trailing_crc)
    assert not problems, f"docs/FORMAT.md ({section}) disagrees with wal/format.py ({name}): " + "; ".join(problems)


def test_sizes_stated_in_prose():
    assert re.search(r"starts with a (\d+)-byte header", SECTIONS["Segment file"]).group(1) == str(fmt.SEGMENT_HEADER_SIZE)
    assert fmt.SEGMENT_HEADER_SIZE == fmt.SEGMENT_HEADER.size + 4
    assert re.search(r"A record is a (\d+)-byte header", SECTIONS["Record"]).group(1) == str(fmt.RECORD_HEADER_SIZE)
    assert fmt.RECORD_HEADER_SIZE == fmt.RECORD_HEADER.size
    hint = SECTIONS["Hint file"]
    assert int(re.search(r"Header, (\d+) bytes", hint).group(1)) == fmt.HINT_HEADER.size
    assert int(re.search(r"entries of (\d+) bytes each", hint).group(1)) == fmt.HINT_ENTRY.size
    assert int(re.search(r"a (\d+)-byte CRC-32C", hint).group(1)) == fmt.HINT_CRC.size
    compaction = SECTIONS["Compaction commit record"]
    assert int(re.search(r"segment numbers \((\d+) bytes each\)", compaction).group(1)) == fmt.COMPACTION_NUMBER.size


def test_record_header_is_crcs_then_fields():
    """RECORD_HEADER must be RECORD_CRCS followed by RECORD_FIELDS, and header_crc covers the fields."""
    assert struct_field_sizes(fmt.RECORD_CRCS.format) + struct_field_sizes(fmt.RECORD_FIELDS.format) == struct_field_sizes(
        fmt.RECORD_HEADER.format
    )
    assert fmt.RECORD_CRCS.size + fmt.RECORD_FIELDS.size == fmt.RECORD_HEADER.size
    rows = {row["field"]: row for row in layout_table("Record")}
    start, end = map(int, re.search(r"bytes (\d+)\.\.(\d+)", rows["header_crc"]["meaning"]).groups())
    assert (start, end) == (fmt.RECORD_CRCS.size, fmt.RECORD_HEADER_SIZE)
    assert int(rows["header_crc"]["offset"]) + int(rows["header_crc"]["size"]) == fmt.RECORD_CRCS.size


def test_segment_header_crc_range():
    rows = {row["field"]: row for row in layout_table("Segment file")}
    start, end = map(int, re.search(r"bytes (\d+)\.\.(\d+)", rows["header_crc"]["meaning"]).groups())
    assert (start, end) == (0, fmt.SEGMENT_HEADER.size)
    assert int(rows["header_crc"]["offset"]) == fmt.SEGMENT_HEADER.size


def _struct_comment_names(variable: str) -> list[str]:
    """The field names in the comment after `VARIABLE = struct.Struct(...)` in wal/format.py."""
    for line in FORMAT_SOURCE.read_text().splitlines():
        if line.startswith(f"{variable} = struct.Struct(") and "#" in line:
            return [name.strip() for name in line.split("#", 1)[1].split(",")]
    raise AssertionError(f"wal/format.py has no commented {variable}")


@pytest.mark.parametrize(
    "name, variable",
    [
        ("segment header", "SEGMENT_HEADER"),
        ("hint header", "HINT_HEADER"),
        ("hint entry", "HINT_ENTRY"),
        ("compaction header", "COMPACTION_HEADER"),
    ],
)
def test_field_names_match_struct_comments(name, variable):
    section, index, _, trailing_crc = LAYOUTS[name]
    rows = layout_table(section, index)
    if trailing_crc:
        rows = rows[:-1]
    assert [row["field"] for row in rows] == _struct_comment_names(variable)


def test_record_field_names_match_struct_comment():
    rows = layout_table("Record")
    assert [row["field"] for row in rows[:2]] == ["crc", "header_crc"]
    assert [row["field"] for row in rows[2:]] == _struct_comment_names("RECORD_FIELDS")


def _magic(rows) -> bytes:
    meaning = {row["field"]: row["meaning"] for row in rows}["magic"]
    literal = re.fullmatch(r"`([^`]+)`", meaning).group(1)
    return codecs.decode(literal, "unicode_escape").encode("latin-1")


def _version(rows) -> int:
    meaning = {row["field"]: row["meaning"] for row in rows}["version"]
    return int(re.findall(r"\d+", meaning)[-1])


@pytest.mark.parametrize(
    "section, index, magic",
    [
        ("Segment file", 0, fmt.SEGMENT_MAGIC),
        ("Hint file", 0, fmt.HINT_MAGIC),
        ("Compaction commit record", 0, fmt.COMPACTION_MAGIC),
        ("SYNCED file", 0, fmt.SYNCED_MAGIC),
    ],
)
def test_magic_and_version(section, index, magic):
    rows = layout_table(section, index)
    assert _magic(rows) == magic
    assert len(magic) == int({row["field"]: row for row in rows}["magic"]["size"])
    assert _version(rows) == fmt.FORMAT_VERSION


def test_magics_are_distinct():
    assert len({fmt.SEGMENT_MAGIC, fmt.HINT_MAGIC, fmt.COMPACTION_MAGIC}) == 3


def test_segment_kinds():
    meaning = {row["field"]: row["meaning"] for row in layout_table("Segment file")}["kind"]
    kinds = {name: int(code) for code, name in re.findall(r"(\d+) = ([A-Z]+)", meaning)}
    assert kinds == {"LOG": 1, "COMPACTED": 2, "DECISIONS": 3}
    for name, code in kinds.items():
        assert getattr(fmt, f"KIND_{name}") == code
    assert set(fmt.SEGMENT_KINDS) == set(kinds.values())


def test_record_types():
    meaning = {row["field"]: row["meaning"] for row in layout_table("Record")}["type"]
    types = {name: int(code) for code, name in re.findall(r"(\d+) ([A-Z]+)", meaning)}
    assert types == {"PUT": 1, "DELETE": 2, "PREPARE": 3, "COMMIT": 4, "ABORT": 5}
    for name, code in types.items():
        assert getattr(fmt, name) == code
    assert fmt.RECORD_TYPES == tuple(sorted(types.values()))
    assert "0 is never valid" in meaning and 0 not in fmt.RECORD_TYPES
    assert set(fmt.DATA_RECORD_TYPES) == {fmt.PUT, fmt.DELETE}


def test_prepare_entry_types():
    meaning = {row["field"]: row["meaning"] for row in layout_table("PREPARE value")}["type"]
    types = {name: int(code) for code, name in re.findall(r"(\d+) ([A-Z_]+)", meaning)}
    assert types == {"PUT": fmt.PUT, "DELETE": fmt.DELETE, "EXPECT": fmt.PREPARE_EXPECT, "EXPECT_ABSENT": fmt.PREPARE_EXPECT_ABSENT}
    assert int(re.search(r"each a (\d+)-byte header", SECTIONS["PREPARE value"]).group(1)) == fmt.PREPARE_ENTRY.size


def _power_expr(text: str) -> int:
    match = re.fullmatch(r"(\d+)\^(\d+)(-\d+)?", text)
    if match:
        return int(match.group(1)) ** int(match.group(2)) + int(match.group(3) or 0)
    return int(text)


def test_record_length_limits():
    rows = {row["field"]: row["meaning"] for row in layout_table("Record")}
    low, high = re.match(r"(\S+)\.\.(\S+)", rows["key_len"]).groups()
    assert (int(low), _power_expr(high)) == (1, fmt.MAX_KEY_LEN)
    low, high = re.match(r"(\S+)\.\.(\S+)", rows["value_len"]).groups()
    assert (int(low), _power_expr(high)) == (0, fmt.MAX_VALUE_LEN_FORMAT)
    # the limits fit their fields
    sizes = {row["field"]: int(row["size"]) for row in layout_table("Record")}
    assert fmt.MAX_KEY_LEN < 2 ** (8 * sizes["key_len"])
    assert fmt.MAX_VALUE_LEN_FORMAT < 2 ** (8 * sizes["value_len"])


def test_segment_names():
    assert fmt.segment_name(1) == "0000000000000001.log"
    assert fmt.hint_name(0xAB) == "00000000000000ab.hint"
    assert fmt.parse_segment_name(fmt.segment_name(2**64 - 1)) == 2**64 - 1
    for bad in ("0000000000000001.log.tmp", "1.log", "000000000000000g.log", "0000000000000001.hint", "COMPACTION"):
        assert fmt.parse_segment_name(bad) is None


# -- the checker itself must be able to fail ---------------------------------------------------
def test_struct_field_sizes_parses_counts():
    assert struct_field_sizes("<8sHBBIQI") == [8, 2, 1, 1, 4, 8, 4]
    assert struct_field_sizes("<IB3xIIQQ") == [4, 1, 3, 4, 4, 8, 8]
    assert struct_field_sizes("<2I") == [4, 4]


@pytest.mark.parametrize(
    "name, changed",
    [
        ("segment header", "<8sHBBQQI"),  # shard widened to 8 bytes
        ("segment header", "<8sHBBIIQ"),  # fields swapped, same total size
        ("record header", "<IIBBHIIIQI"),  # expires_at narrowed
        ("hint entry", "<IB3xIIQI"),
        ("hint entry", "<IB2xBIIQQ"),  # same size, a reserved byte turned into a field
        ("hint header", "<8sHHIQQ"),
        ("compaction header", "<8sHHIIQ"),
    ],
)
def test_checker_detects_a_struct_changed_without_the_doc(name, changed):
    section, index, _, trailing_crc = LAYOUTS[name]
    assert layout_problems(layout_table(section, index), struct.Struct(changed), trailing_crc)


def test_checker_detects_a_doc_changed_without_the_struct():
    rows = [dict(row) for row in layout_table("Segment file")]
    rows[4]["size"] = "8"  # shard widened in the doc only
    assert layout_problems(rows, fmt.SEGMENT_HEADER, True)
    rows = [dict(row) for row in layout_table("Record")]
    rows[5]["offset"] = "13"  # a gap
    assert layout_problems(rows, fmt.RECORD_HEADER, False)

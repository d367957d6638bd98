"""The functional groups of an enhanced multi-frame header, read in one pass without pydicom Datasets.

A DBT object keeps each frame's position, window and rescale in PerFrameFunctionalGroupsSequence:
60-90 items of 3-6 nested sequences each. Reading them through pydicom's Dataset API builds a
Dataset per nested item and converts every value on first access, about 250 us per frame, so the
header of a 60-frame volume cost ten times the decode of the slice the user wants to see. Here
pydicom's own element generator walks the raw bytes once (about 45 us per frame) and keeps the raw
values of each macro; values are converted only when asked for, the usual text VRs by a few lines
here and everything else by pydicom.
"""

from __future__ import annotations

import functools
import io
import struct
from typing import Any, Iterable, Iterator

from pydicom.datadict import dictionary_has_tag, dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filereader import data_element_generator
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag, Tag
from pydicom.values import convert_value

SHARED = Tag(0x5200, 0x9229)  # SharedFunctionalGroupsSequence
PER_FRAME = Tag(0x5200, 0x9230)  # PerFrameFunctionalGroupsSequence
ITEM, SEQ_DELIM = (0xFFFE, 0xE000), (0xFFFE, 0xE0DD)
NUMERIC_TEXT = {"DS", "IS"}
PLAIN_TEXT = {"CS", "LO", "SH", "ST", "LT", "UT", "UC", "AE", "DA", "TM", "DT", "UI"}


class Item:
    """One sequence item: attribute keyword -> value, converted on first access.

    Supports what the metadata code asks of a pydicom Dataset: ``get``, ``in`` and truthiness."""

    __slots__ = ("_raw", "_values")

    def __init__(self, raw: dict[int, Any]):
        self._raw = raw  # tag -> RawDataElement, DataElement, or list[Item] for a sequence
        self._values: dict[int, Any] = {}

    def __contains__(self, keyword: str) -> bool:
        return _tag(keyword) in self._raw

    def __bool__(self) -> bool:
        return bool(self._raw)

    def __repr__(self) -> str:
        return f"Item({', '.join(keyword_for_tag(t) or hex(t) for t in self._raw)})"

    def get(self, keyword: str, default: Any = None) -> Any:
        tag = _tag(keyword)
        if tag not in self._raw:
            return default
        if tag not in self._values:
            self._values[tag] = _convert(self._raw[tag])
        return self._values[tag]


@functools.lru_cache(maxsize=None)
def _tag(keyword: str) -> int:
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise KeyError(f"{keyword} is not a DICOM keyword")
    return tag


def _convert(element: Any) -> Any:
    """A raw element's value as pydicom would give it (numbers for DS/IS, str for text VRs)."""
    if isinstance(element, list):  # a nested sequence, already split into Items
        return element
    if not isinstance(element, RawDataElement):  # pydicom already converted it
        return element.value
    value, vr = element.value, element.VR
    if value is None or value == b"":
        return "" if vr in PLAIN_TEXT | NUMERIC_TEXT else None
    if vr in NUMERIC_TEXT or vr in PLAIN_TEXT:
        parts = [p.strip(b" \x00").decode("latin-1") for p in value.split(b"\\")]
        if vr in NUMERIC_TEXT:
            try:
                numbers = [float(p) if vr == "DS" else int(p) for p in parts]
            except ValueError:
                return value.decode("latin-1").strip()  # malformed: the text, like pydicom's lenient mode
            return numbers[0] if len(numbers) == 1 else numbers
        return parts[0] if len(parts) == 1 else parts
    return convert_value(vr, element)


def _parse_item(elements: Iterable[Any], encoding: tuple[bool, bool], memo: dict[bytes, Item]) -> Item:
    raw: dict[int, Any] = {}
    for element in elements:
        vr = element.VR
        if vr is None:  # implicit VR: the dictionary says; private tags are nothing we ask for
            if element.tag.is_private or not dictionary_has_tag(element.tag):
                continue
            vr = dictionary_VR(element.tag).split(" or ")[0]  # "US or SS": either reads
            element = element._replace(VR=vr)
        raw[element.tag] = _parse_sequence(element.value, encoding, memo) if vr == "SQ" else element
    return Item(raw)


def _parse_sequence(value: Any, encoding: tuple[bool, bool], memo: dict[bytes, Item]) -> list[Item]:
    """A sequence value, raw bytes (defined length, not yet parsed) or a parsed pydicom Sequence.
    `memo` maps item bytes already parsed to their Item: most per-frame macros (the window, the
    pixel measures) repeat byte for byte in every frame and are parsed once."""
    if isinstance(value, Sequence) or isinstance(value, list):
        return [_parse_item(ds.elements(), encoding, memo) for ds in value]
    implicit, little = encoding
    stream, items = io.BytesIO(bytes(value or b"")), []
    while True:
        head = stream.read(8)
        if len(head) < 8:
            return items
        group, elem, length = struct.unpack("<HHL" if little else ">HHL", head)
        if (group, elem) == SEQ_DELIM:
            return items
        if (group, elem) != ITEM:
            raise ValueError(f"expected a sequence item, found ({group:04X},{elem:04X})")
        if length == 0xFFFFFFFF:
            # pydicom's generator: an undefined-length item ends where it meets the Item
            # Delimitation Item, leaving the stream just after it.
            items.append(_parse_item(data_element_generator(stream, implicit, little), encoding, memo))
            continue
        buffer = stream.read(length)
        if buffer not in memo:
            try:
                if implicit or not little:
                    raise _Unusual("not explicit VR little endian")
                memo[buffer] = _parse_item(_explicit_little(buffer), encoding, memo)
            except _Unusual:
                elements = data_element_generator(io.BytesIO(buffer), implicit, little)
                memo[buffer] = _parse_item(elements, encoding, memo)
        items.append(memo[buffer])


class _Unusual(Exception):
    """An encoding the fast walker leaves to pydicom."""


def _explicit_little(buffer: bytes) -> Iterator[RawDataElement]:
    """The elements of a defined-length explicit VR little endian item: pydicom's generator does the
    same but its per-call set-up cost 15 us, a third of a frame's budget, for each of the ~240 items
    of a DBT header. Anything unusual (undefined lengths) is left to pydicom."""
    position, end = 0, len(buffer)
    while position + 8 <= end:
        group, elem = _TAG.unpack_from(buffer, position)
        vr = buffer[position + 4:position + 6].decode("ascii")
        if vr in _LONG_VRS:
            (length,) = _LENGTH.unpack_from(buffer, position + 8)
            start = position + 12
        else:
            (length,) = _SHORT_LENGTH.unpack_from(buffer, position + 6)
            start = position + 8
        if length == 0xFFFFFFFF:
            raise _Unusual("undefined length inside a defined-length item")
        yield RawDataElement(BaseTag(group << 16 | elem), vr, length, buffer[start:start + length],
                             start, False, True)
        position = start + length


_TAG, _LENGTH, _SHORT_LENGTH = struct.Struct("<HH"), struct.Struct("<L"), struct.Struct("<H")
# VRs with a 2-byte reserved field and a 4-byte length (PS3.5 7.1.2)
_LONG_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}


class FunctionalGroups:
    """Shared and per-frame functional groups: ``item(macro, frame)`` gives the macro's item for
    a frame, the per-frame one where present, else the shared one (PS3.3 C.7.6.16)."""

    def __init__(self, shared: Item | None, per_frame: list[Item]):
        self.shared = shared
        self.per_frame = per_frame

    def __len__(self) -> int:
        return len(self.per_frame)

    def item(self, macro: str, frame: int = 0) -> Item | None:
        if frame < len(self.per_frame):
            found = self.per_frame[frame].get(macro)
            if found:
                return found[0]
        found = self.shared.get(macro) if self.shared is not None else None
        return found[0] if found else None


def functional_groups(ds: Dataset) -> FunctionalGroups:
    """The functional groups of `ds`, parsed once and cached on the dataset."""
    cached = ds.__dict__.get("_mammodino_groups")
    if cached is not None:
        return cached
    implicit, little = ds.original_encoding
    encoding = (bool(implicit), little is not False)
    parsed: dict[Tag, list[Item]] = {}
    memo: dict[bytes, Item] = {}
    for tag in (SHARED, PER_FRAME):
        if tag in ds:
            element = ds.get_item(tag)
            try:
                parsed[tag] = _parse_sequence(element.value, encoding, memo)
            except (ValueError, struct.error, EOFError):
                parsed[tag] = []  # a damaged sequence counts as absent, as pydicom's lenient reading would
    shared = parsed.get(SHARED) or []
    groups = FunctionalGroups(shared[0] if shared else None, parsed.get(PER_FRAME, []))
    ds.__dict__["_mammodino_groups"] = groups
    return groups

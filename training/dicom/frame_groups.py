"""The functional groups of an enhanced multi-frame header, read in one pass without pydicom Datasets.

A DBT object keeps each frame's position, window and rescale in PerFrameFunctionalGroupsSequence:
60-90 items of 3-6 nested sequences each. Reading them through pydicom's Dataset API builds a
Dataset per nested item and converts every value on first access, about 250 us per frame, so the
header of a 60-frame volume cost ten times the decode of the slice the user wants to see. Here
pydicom's own element generator walks the raw bytes once (about 45 us per frame) and keeps the raw
values of each macro; values are converted only when asked for, the usual text VRs by a few lines
here and everything else by pydicom.

Per-frame items are parsed when a frame is first asked for, once per distinct item (:class:`PerFrame`),
so opening a 240-frame volume costs what opening a 30-frame one does; questions about every frame
("do all frames share this window?") are answered from the raw bytes where they allow
(:meth:`FunctionalGroups.same_in_every_frame`), not by parsing every frame.
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


# Value representations no character set changes: numbers, codes, UIDs, dates.
_PLAIN_VRS = {"US", "UL", "SS", "SL", "FL", "FD", "CS", "UI", "DS", "IS", "AS", "DA", "TM", "DT"}


def value_of(source: Any, keyword: str, default: Any = None) -> Any:
    """``source.get(keyword, default)``, for a pydicom Dataset or an :class:`Item`. A Dataset's values
    that no character set can change convert here, as functional-group values do: pydicom's first
    conversion of an element cost ~30 us, and a DBT header needs ~40 of them before its first slice."""
    if not isinstance(source, Dataset):
        return source.get(keyword, default)
    tag = _tag(keyword)
    if tag not in source:
        return default
    element = source.get_item(tag)
    if isinstance(element, RawDataElement) and element.VR in _PLAIN_VRS:
        return _convert(element)
    if isinstance(element, RawDataElement) and element.VR == "SQ" and isinstance(element.value, bytes):
        implicit, little = source.original_encoding  # a sequence of Items, as functional groups are
        try:
            return _parse_sequence(element.value, (bool(implicit), little is not False), {})
        except (ValueError, struct.error, EOFError):
            pass  # pydicom's reading says what is wrong with it
    return source.get(keyword, default)


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
        items.append(_parse_buffer(stream.read(length), encoding, memo))


def _parse_buffer(buffer: bytes, encoding: tuple[bool, bool], memo: dict[bytes, Item]) -> Item:
    """The Item of a defined-length item's bytes, parsed once (`memo`) whatever repeats it."""
    found = memo.get(buffer)
    if found is not None:
        return found
    implicit, little = encoding
    try:
        if implicit or not little:
            raise _Unusual("not explicit VR little endian")
        found = _parse_item(_explicit_little(buffer), encoding, memo)
    except _Unusual:
        found = _parse_item(data_element_generator(io.BytesIO(buffer), implicit, little), encoding, memo)
    memo[buffer] = found
    return found


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


class PerFrame:
    """The items of PerFrameFunctionalGroupsSequence, each parsed when its frame is first asked for.

    Three shapes of value: the raw bytes of a defined-length sequence whose items have defined
    lengths (the usual case: finding the items is one skip per item, parsing waits), the Datasets
    pydicom already split an undefined-length sequence into (each converted when asked for), or
    anything else, parsed whole now as before."""

    def __init__(self, value: Any, encoding: tuple[bool, bool], memo: dict[bytes, Item]):
        self._encoding, self._memo = encoding, memo
        self._raw: bytes | None = None
        self._spans: list[tuple[int, int]] = []
        self._datasets: list[Dataset] | None = None
        if isinstance(value, (Sequence, list)):
            self._datasets = list(value)
            self._items: list[Item | None] = [None] * len(self._datasets)
            return
        raw = bytes(value or b"")
        spans = _item_spans(raw, encoding[1])
        if spans is None:  # an undefined-length item: its end is only found by parsing it
            self._items = list(_parse_sequence(raw, encoding, memo))
            return
        self._raw, self._spans = raw, spans
        self._items = [None] * len(spans)

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, frame: int) -> Item:
        found = self._items[frame]
        if found is None:
            try:
                if self._datasets is not None:
                    found = _parse_item(self._datasets[frame].elements(), self._encoding, self._memo)
                else:
                    start, end = self._spans[frame]
                    found = _parse_buffer(self._raw[start:end], self._encoding, self._memo)  # type: ignore[index]
            except (ValueError, struct.error, EOFError):
                found = Item({})  # a damaged item counts as absent, as pydicom's lenient reading would
            self._items[frame] = found
        return found

    def same_everywhere(self, tag: int, n_frames: int) -> bool:
        """True when no item holds element `tag` (every frame takes the shared one), or when each of
        the `n_frames` frames has an item holding byte for byte the same element; False when they
        differ or when the bytes cannot tell without parsing every frame."""
        if self._raw is not None:
            key = struct.pack("<HH" if self._encoding[1] else ">HH", tag >> 16, tag & 0xFFFF)
            found = self._raw.count(key)
            if found == 0:
                return True
            if found != len(self._spans) or len(self._spans) < n_frames:
                return False
            # Every occurrence of the tag starts the same whole element, exactly one per item.
            element = _element_bytes(self._raw, *self._spans[0], key, self._encoding)
            return element is not None and self._raw.count(element) == found
        if self._datasets is not None:
            elements = [ds.get_item(tag) if tag in ds else None for ds in self._datasets]
            if all(e is None for e in elements):
                return True
            first = elements[0]
            return (len(elements) >= n_frames and isinstance(first, RawDataElement)
                    and isinstance(first.value, bytes)
                    and all(isinstance(e, RawDataElement) and e.value == first.value for e in elements))
        return False


def _item_spans(raw: bytes, little: bool) -> list[tuple[int, int]] | None:
    """(start, end) of each item's value in a sequence value, skipping from item header to item
    header; None when an item has undefined length. Raises ValueError on anything but items, or an
    item that runs past the value (a length that lies)."""
    header = struct.Struct("<HHL" if little else ">HHL")
    spans, position, end = [], 0, len(raw)
    while position + 8 <= end:
        group, elem, length = header.unpack_from(raw, position)
        if (group, elem) == SEQ_DELIM:
            break
        if (group, elem) != ITEM:
            raise ValueError(f"expected a sequence item, found ({group:04X},{elem:04X})")
        if length == 0xFFFFFFFF:
            return None
        position += 8
        if position + length > end:
            raise ValueError("a sequence item runs past the end of its sequence")
        spans.append((position, position + length))
        position += length
    return spans


def _element_bytes(raw: bytes, start: int, end: int, key: bytes, encoding: tuple[bool, bool]) -> bytes | None:
    """The whole encoded element (header and value) whose tag bytes are `key` at the top level of
    the item raw[start:end]; None if it is not there or has an undefined length."""
    implicit, little = encoding
    short, long = struct.Struct("<H" if little else ">H"), struct.Struct("<L" if little else ">L")
    position = start
    while position + 8 <= end:
        if implicit:
            (length,), value = long.unpack_from(raw, position + 4), position + 8
        elif raw[position + 4:position + 6].decode("latin-1") in _LONG_VRS:
            (length,), value = long.unpack_from(raw, position + 8), position + 12
        else:
            (length,), value = short.unpack_from(raw, position + 6), position + 8
        if length == 0xFFFFFFFF:
            return None
        if raw[position:position + 4] == key:
            return raw[position:value + length]
        position = value + length
    return None


class FunctionalGroups:
    """Shared and per-frame functional groups: ``item(macro, frame)`` gives the macro's item for
    a frame, the per-frame one where present, else the shared one (PS3.3 C.7.6.16)."""

    def __init__(self, shared: Item | None, per_frame: PerFrame | list[Item]):
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

    def same_in_every_frame(self, macro: str, n_frames: int) -> bool:
        """True when frames 0..n_frames-1 all see one item of `macro` (see :meth:`PerFrame.same_everywhere`):
        then ``item(macro, 0)`` stands for every frame and no other frame needs parsing. False means
        "look at each frame", not that they differ."""
        if not isinstance(self.per_frame, PerFrame):
            return not len(self.per_frame)
        return self.per_frame.same_everywhere(_tag(macro), n_frames)


def functional_groups(ds: Dataset) -> FunctionalGroups:
    """The functional groups of `ds`, read once and cached on the dataset; per-frame items are
    parsed as frames are asked for."""
    cached = ds.__dict__.get("_mammodino_groups")
    if cached is not None:
        return cached
    implicit, little = ds.original_encoding
    encoding = (bool(implicit), little is not False)
    memo: dict[bytes, Item] = {}
    shared: list[Item] = []
    per_frame: PerFrame | list[Item] = []
    if SHARED in ds:
        try:
            shared = _parse_sequence(ds.get_item(SHARED).value, encoding, memo)
        except (ValueError, struct.error, EOFError):
            shared = []  # a damaged sequence counts as absent, as pydicom's lenient reading would
    if PER_FRAME in ds:
        try:
            per_frame = PerFrame(ds.get_item(PER_FRAME).value, encoding, memo)
        except (ValueError, struct.error, EOFError):
            per_frame = []
    groups = FunctionalGroups(shared[0] if shared else None, per_frame)
    ds.__dict__["_mammodino_groups"] = groups
    return groups

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

Vendors often write these sequences with undefined lengths (ended by delimitation items). pydicom then
parses the whole per-frame sequence into Datasets while reading the header, so
:func:`read_until_pixels` reads headers instead: it finds the end (and items) of each top-level
sequence of undefined length by walking element headers (:func:`_undefined_end`) and keeps its bytes
raw, to be parsed frame by frame as above.
"""

from __future__ import annotations

import functools
import io
import mmap
import operator
import struct
from typing import Any, BinaryIO, Iterable, Iterator

import pydicom
from pydicom.datadict import dictionary_has_tag, dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filereader import data_element_generator, read_partial
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag, Tag
from pydicom.uid import DeflatedExplicitVRLittleEndian
from pydicom.values import convert_SQ, convert_value

SHARED = Tag(0x5200, 0x9229)  # SharedFunctionalGroupsSequence
PER_FRAME = Tag(0x5200, 0x9230)  # PerFrameFunctionalGroupsSequence
ITEM, SEQ_DELIM = (0xFFFE, 0xE000), (0xFFFE, 0xE0DD)
UNDEFINED = 0xFFFFFFFF
MAX_DEPTH = 64  # sequences and items nested in one another; real headers nest fewer than 10
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
    """A sequence value, raw bytes (not yet parsed) or a parsed pydicom Sequence.
    `memo` maps item bytes already parsed to their Item: most per-frame macros (the window, the
    pixel measures) repeat byte for byte in every frame and are parsed once."""
    if isinstance(value, Sequence) or isinstance(value, list):
        return [_parse_item(ds.elements(), encoding, memo) for ds in value]
    raw = bytes(value or b"")
    try:
        spans, _ = _item_spans(raw, encoding)
    except _Unusual:
        return _parse_sequence(_pydicom_items(raw, encoding), encoding, memo)
    return [_parse_buffer(raw[start:end], encoding, memo) for start, end in spans]


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


def _pydicom_items(raw: bytes, encoding: tuple[bool, bool]) -> Sequence:
    """pydicom's split of a sequence value the walker cannot follow (e.g. implicit VR items in an
    explicit VR file); whatever pydicom raises on damaged bytes reads as damage, a ValueError."""
    try:
        return convert_SQ(raw, *encoding)
    except Exception as exc:  # pydicom raises many types for damaged bytes
        raise ValueError(f"a damaged sequence ({exc})") from None


def _explicit_little(buffer: bytes) -> Iterator[RawDataElement]:
    """The elements of an item's value in explicit VR little endian: pydicom's generator does the
    same but its per-call set-up cost 15 us, a third of a frame's budget, for each of the ~240 items
    of a DBT header. An undefined-length sequence is walked to its delimiter and kept raw, as pydicom
    keeps a defined-length one; anything else unusual is left to pydicom."""
    for _, tag, vr, length, start, stop, _ in _elements(buffer, (False, True)):
        yield RawDataElement(BaseTag(tag), vr, length, buffer[start:stop], start, False, True)


def _elements(buffer: Any, encoding: tuple[bool, bool]) -> Iterator[tuple[int, int, str | None, int, int, int, int]]:
    """(header position, tag, VR (None in implicit VR), length, value start, value end, next position)
    of each element at the top level of an item's value, reading headers only. An undefined-length
    sequence's value ends before its delimiter; an undefined length on anything else, or a sequence
    the walker cannot follow, raises :class:`_Unusual`."""
    implicit, little = encoding
    implicit_head, explicit_head, long_length = _HEADERS[little]
    position, end = 0, len(buffer)
    while position + 8 <= end:
        vr: str | None = None
        if implicit:
            group, elem, length = implicit_head.unpack_from(buffer, position)
            start = position + 8
        else:
            group, elem, vr_bytes, length = explicit_head.unpack_from(buffer, position)
            vr, start = vr_bytes.decode("ascii"), position + 8
            if vr in _LONG_VRS:
                (length,) = long_length.unpack_from(buffer, position + 8)
                start = position + 12
        stop = after = start + length
        if length == UNDEFINED:
            if vr not in ("SQ", None):
                raise _Unusual("an undefined-length value that is not a sequence")
            try:
                stop, after = _undefined_end(buffer, start, encoding, in_item=False)
            except (ValueError, struct.error):
                raise _Unusual("a sequence the walker cannot follow") from None
        yield position, group << 16 | elem, vr, length, start, stop, after
        position = after


# VRs with a 2-byte reserved field and a 4-byte length (PS3.5 7.1.2)
_LONG_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
_VRS = ("AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR US "
        "UT UV").split()
_HAS_LONG_LENGTH = {vr.encode(): vr in _LONG_VRS for vr in _VRS}  # explicit VR bytes -> 4-byte length?
# Per byte order: tag + 4-byte length (implicit VR, items), tag + VR + 2-byte length, a 4-byte length.
_HEADERS = {little: (struct.Struct(f"{order}HHL"), struct.Struct(f"{order}HH2sH"), struct.Struct(f"{order}L"))
            for little, order in ((True, "<"), (False, ">"))}


def _undefined_end(raw: Any, position: int, encoding: tuple[bool, bool], in_item: bool = True,
                   seen: dict[bytes, bytes] | None = None, read: list[tuple[int, int]] | None = None) -> tuple[int, int]:
    """Where the undefined-length item (`in_item`) or sequence whose value starts at `position` ends:
    (its delimiter's position, the position after it). Only element headers are read: a defined
    length is skipped, an undefined one (a sequence or an item) entered and left at its delimiter, so
    nothing is built or converted and no header value sizes anything. `seen` maps a sequence's tag
    bytes to its last whole encoding, so that the macros repeated in every frame are skipped by one
    comparison. `read`, when given, collects the (start, end) of every byte range the walk's course
    depended on (see :func:`_walk_shape`). Raises ValueError on anything but items in a sequence,
    nesting past MAX_DEPTH, or no delimiter before the end of `raw` (a truncated file, a length that
    lies), and _Unusual on a VR it does not know (e.g. implicit VR items in an explicit VR file,
    which pydicom reads)."""
    implicit, little = encoding
    implicit_head, explicit_head, long_length = _HEADERS[little]
    unpack = (implicit_head if implicit else explicit_head).unpack_from
    seen = {} if seen is None else seen
    limit, outer = len(raw), []  # outer: (in_item, header position of a sequence) of each enclosing value
    while position + 8 <= limit:
        if implicit:
            group, elem, length = unpack(raw, position)
        else:  # the 4 bytes after the tag are a VR and a 2-byte length, or an item's 4-byte length
            group, elem, vr, length = unpack(raw, position)
        if read is not None:
            long_header = not implicit and group != 0xFFFE and _HAS_LONG_LENGTH.get(vr)
            read.append((position, position + (12 if long_header else 8)))
        if group == 0xFFFE:
            if elem == 0xE000 and not in_item:  # an item of the sequence we are in
                if not implicit:
                    (length,) = long_length.unpack_from(raw, position + 4)
                position += 8
                if length != UNDEFINED:
                    position += length
                    continue
                outer.append((in_item, -1))
                in_item = True
            elif elem == (0xE00D if in_item else 0xE0DD):  # the delimiter of the item or sequence we are in
                if not outer:
                    return position, position + 8
                in_item, start = outer.pop()
                position += 8
                if start >= 0:
                    seen[raw[start:start + 4]] = raw[start:position]
                continue
            else:
                raise ValueError(f"unexpected ({group:04X},{elem:04X}) in a sequence at byte {position}")
        elif not in_item:
            raise ValueError(f"expected a sequence item at byte {position}, found ({group:04X},{elem:04X})")
        else:
            start = position
            if implicit:
                position += 8
            else:
                long = _HAS_LONG_LENGTH.get(vr)
                if long is None:
                    raise _Unusual(f"VR {vr!r} at byte {position}")
                if long:
                    (length,) = long_length.unpack_from(raw, position + 8)
                position += 12 if long else 8
            if length != UNDEFINED:
                position += length
                continue
            known = seen.get(raw[start:start + 4])
            if known is not None and raw[start:start + len(known)] == known:
                position = start + len(known)  # a sequence seen before, byte for byte: it ends where it did
                if read is not None:
                    read.append((start, position))
                continue
            outer.append((in_item, start))
            in_item = False
        if len(outer) > MAX_DEPTH:
            raise ValueError(f"sequences nested more than {MAX_DEPTH} deep")
    raise ValueError("a sequence or item of undefined length has no delimiter: the file is truncated or a length lies")


class PerFrame:
    """The items of PerFrameFunctionalGroupsSequence, each parsed when its frame is first asked for.

    Two shapes of value: raw bytes (the usual case: finding the items is one skip per item, or a
    walk over element headers where they have undefined length; parsing waits), or the Datasets
    pydicom already split the sequence into (each converted when asked for). `spans` are the items'
    (start, end) in the raw bytes where the caller already found them (:func:`read_until_pixels`)."""

    def __init__(self, value: Any, encoding: tuple[bool, bool], memo: dict[bytes, Item],
                 spans: list[tuple[int, int]] | None = None):
        self._encoding, self._memo = encoding, memo
        self._raw: bytes | None = None
        self._spans: list[tuple[int, int]] = []
        self._datasets: list[Dataset] | None = None
        if not isinstance(value, (Sequence, list)):
            raw = bytes(value or b"")
            try:
                self._raw, self._spans = raw, spans if spans is not None else _item_spans(raw, encoding)[0]
            except _Unusual:
                value = _pydicom_items(raw, encoding)
        if self._raw is None:
            self._datasets = list(value)
        count = len(self._datasets) if self._datasets is not None else len(self._spans)
        self._items: list[Item | None] = [None] * count

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


def _item_spans(raw: Any, encoding: tuple[bool, bool], position: int = 0,
                delimited: bool = False) -> tuple[list[tuple[int, int]], int]:
    """(start, end) of each item's value in a sequence value from `position` on, skipping from item
    header to item header (an undefined-length item is walked to its delimiter, or recognised as
    shaped like the item before it), and the position after the sequence: the end of `raw`, or, when
    `delimited` (an undefined-length sequence in a file), the end of its Sequence Delimitation Item.
    Raises ValueError on anything but items, an item that runs past `raw` (a length that lies), or,
    when `delimited`, no delimiter."""
    header = _HEADERS[encoding[1]][0]
    spans: list[tuple[int, int]] = []
    seen: dict[bytes, bytes] = {}  # shared by the items: their repeated macros are walked once
    shape, walked = None, None  # walked: the last item walked, shaped only if another item follows
    end = len(raw)
    while position + 8 <= end:
        group, elem, length = header.unpack_from(raw, position)
        if (group, elem) == SEQ_DELIM:
            return spans, position + 8
        if (group, elem) != ITEM:
            raise ValueError(f"expected a sequence item, found ({group:04X},{elem:04X})")
        if length == UNDEFINED:
            if walked is not None:
                shape, walked = _walk_shape(raw, *walked), None
            if shape is not None and shape[1](raw[position:position + shape[0]]) == shape[2]:
                after = position + shape[0]
            else:
                read = [(position, position + 8)]
                after = _undefined_end(raw, position + 8, encoding, seen=seen, read=read)[1]
                walked = (position, after, read)
            spans.append((position + 8, after - 8))
        else:
            after = position + 8 + length
            if after > end:
                raise ValueError("a sequence item runs past the end of its sequence")
            spans.append((position + 8, after))
        position = after
    if delimited:
        raise ValueError("a sequence of undefined length has no delimiter: the file is truncated")
    return spans, position


def _walk_shape(raw: Any, start: int, end: int, read: list[tuple[int, int]]) -> tuple[int, Any, Any]:
    """What an undefined-length item walked from `start` to `end` looked like to the walk: its length,
    a getter of the byte ranges `read` the walk's course depended on (headers, lengths, sequences
    compared whole), and those bytes. An item with the same bytes there would be walked the same way
    to the same length, so per-frame items that differ only in their values (positions, frame
    numbers) are recognised by one comparison instead of a walk over their ~20 headers."""
    ranges: list[tuple[int, int]] = []
    for a, b in sorted(read):  # adjacent headers (a sequence's, its item's) as one range: fewer slices
        if ranges and a <= ranges[-1][1]:
            ranges[-1] = (ranges[-1][0], max(b, ranges[-1][1]))
        else:
            ranges.append((a, b))
    getter = operator.itemgetter(*(slice(a - start, b - start) for a, b in ranges))
    return end - start, getter, getter(raw[start:end])


def _element_bytes(raw: bytes, start: int, end: int, key: bytes, encoding: tuple[bool, bool]) -> bytes | None:
    """The whole encoded element (header and value, and its delimiter if it has undefined length)
    whose tag bytes are `key` at the top level of the item raw[start:end]; None if it is not there or
    the bytes cannot say."""
    item = raw[start:end]
    try:
        for position, _, _, _, _, _, after in _elements(item, encoding):
            if item[position:position + 4] == key:
                return item[position:after]
    except (ValueError, struct.error, _Unusual):
        return None
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
        value = ds.get_item(PER_FRAME).value
        walked = ds.__dict__.get(_WALKED)  # (raw, spans) from read_until_pixels
        spans = walked[1] if walked is not None and walked[0] is value else None
        try:
            per_frame = PerFrame(value, encoding, memo, spans)
        except (ValueError, struct.error, EOFError):
            per_frame = []
    groups = FunctionalGroups(shared[0] if shared else None, per_frame)
    ds.__dict__["_mammodino_groups"] = groups
    return groups


# --- reading a header whose sequences have undefined length ------------------------------------

_PIXEL_TAGS = {0x7FE00010, 0x7FE00009, 0x7FE00008}  # where pydicom's stop_before_pixels stops
_WALKED = "_mammodino_per_frame_spans"  # ds.__dict__ key: (raw per-frame value, its items' spans)


def read_until_pixels(f: BinaryIO) -> Dataset:
    """``pydicom.dcmread(f, stop_before_pixels=True)``, leaving `f` at the pixel data as it does, except
    that top-level sequences of undefined length are not parsed: pydicom would build a Dataset for
    every item of every frame of PerFrameFunctionalGroupsSequence before returning. Here each one's
    end (and items) is found by walking element headers and its value stays raw bytes, as pydicom
    keeps a defined-length sequence's, parsed when asked for (per frame: :class:`PerFrame`). What the
    walk leaves to pydicom (big endian, deflated, a VR it does not know) is read whole by pydicom;
    damage it finds (no delimiter, a length that lies, absurd nesting) raises ValueError."""
    start, stopped = f.tell(), []

    def stop(tag: BaseTag, vr: str | None, length: int) -> bool:
        if length == UNDEFINED and _is_sequence(tag, vr):
            stopped.append(tag)
            return True
        return tag in _PIXEL_TAGS

    ds = read_partial(f, stop_when=stop)
    if stopped:
        try:
            _read_on(ds, f, stopped, stop)
        except _Unusual:  # not damage, which raises: pydicom would read on past a length that lies
            f.seek(start)
            return pydicom.dcmread(f, stop_before_pixels=True)
    return ds


def _is_sequence(tag: BaseTag, vr: str | None) -> bool:
    """Whether a top-level element of undefined length is a sequence, whose items the walk follows."""
    if vr is None:  # implicit VR: a public sequence by the dictionary; others are pydicom's to guess
        return not tag.is_private and dictionary_has_tag(tag) and dictionary_VR(tag) == "SQ"
    return vr == "SQ"


def _read_on(ds: Dataset, f: BinaryIO, stopped: list[BaseTag], stop: Any) -> None:
    """Complete `ds`, read until pydicom stopped at the undefined-length sequence `stopped[0]` (f is at
    its header): each such sequence becomes a raw element, the elements between them are read by
    pydicom, up to the pixel data."""
    implicit, little = ds.original_encoding
    if little is not True or ds.file_meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
        raise _Unusual("big endian or deflated: the walk leaves these to pydicom")
    encoding = (bool(implicit), True)
    try:
        whole = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # the file's bytes, none copied
    except (OSError, ValueError):
        raise _Unusual("not a file that can be mapped") from None
    with whole:
        while stopped:
            tag = stopped.pop()
            value_at = f.tell() + (8 if implicit else 12)  # after the tag, (VR,) and length
            spans, after = _item_spans(whole, encoding, value_at, delimited=True)
            raw = whole[value_at:after - 8]  # the items, without the sequence delimiter, as pydicom keeps a value
            ds[tag] = RawDataElement(tag, "SQ", UNDEFINED, raw, value_at, encoding[0], True)
            if tag == PER_FRAME:
                ds.__dict__[_WALKED] = (raw, [(a - value_at, b - value_at) for a, b in spans])
            f.seek(after)
            for element in data_element_generator(f, encoding[0], True, stop_when=stop, encoding=ds._character_set):
                ds[element.tag] = element

"""Report sentences from attribute labels, for image-report pretraining when real reports are missing
(Mammo-CLIP, Ghosh et al. 2024, writes its reports the same way).

A labels CSV becomes, per image, a few short sentences that state its attributes: several phrasings
per attribute and per sentence, chosen with a numpy Generator from the seed (same seed, same text;
another seed, other words for the same facts), and negatives where the truth is complete ("no
suspicious calcifications"). The wording lives in data files, one per source kind, in
``report_templates/`` (README "Reports from attributes" documents the format):

* ``phantom.json`` reads the labels CSV of ``mammodino phantom``: view, side, modality, density, and
  per lesion its type, shape, calcification morphology, size, region (quadrant) and depth;
* ``cbis-ddsm.json`` reads CBIS-DDSM case-description CSVs (one row per abnormality): mass shape and
  margins, calcification type and distribution, assessment, pathology, density, side, view.

Two readers turn rows into facts: ``rows`` (one CSV row per finding, rows grouped by ``path``) and
``phantom`` (one row per image, findings from its ``lesions`` JSON, placed on the breast by
:func:`lesion_position`). A value a template does not know is a :class:`MammoInputError` in one line,
never a guess.
"""

from __future__ import annotations

import json
import math
import re
import string
import zlib
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from training.errors import MammoInputError
from training.labels import read_rows

TEMPLATE_DIR = Path(__file__).with_name("report_templates")
FORMAT = 1
READERS = ("rows", "phantom")
SCOPES = ("image", "finding")
DEFAULT_BLANK = ("", "n/a", "na", "nan")
# A lesion centre within this share of the nipple's distance from the chest wall above or below the
# posterior nipple line sits behind the nipple: "central" ("retroareolar" in the anterior third); one
# within this share of the half thickness of mid-height (CC truth) is neither upper nor lower.
CENTRAL_BAND, CENTRAL_HEIGHT = 0.1, 0.15
QUADRANTS = {("upper", "outer"): "UOQ", ("upper", "inner"): "UIQ", ("lower", "outer"): "LOQ",
             ("lower", "inner"): "LIQ"}
_TOP_KEYS = {"format", "about", "reader", "detect", "fields", "sentences"}
_FIELD_KEYS = {"from", "scope", "values", "number", "split", "blank"}
_RULE_KEYS = {"say", "scope", "when"}


# --- templates -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Field:
    """One attribute: where its raw value comes from (the first of ``sources`` that is not blank), and its
    phrasings per raw value (casefolded keys) or, for a number, format strings."""

    name: str
    scope: str
    sources: tuple[str, ...]
    values: dict[str, tuple[str, ...]] | None
    known: tuple[str, ...]  # the values as the template spells them, for error messages
    number: tuple[str, ...]
    split: str | None
    blank: frozenset[str]


@dataclass(frozen=True)
class Rule:
    """One sentence: its phrasings (each with the fields it names) and the raw values it needs."""

    scope: str
    when: dict[str, frozenset[str]]
    say: tuple[tuple[str, frozenset[str]], ...]


@dataclass(frozen=True)
class Templates:
    name: str
    path: Path
    reader: str
    detect: tuple[str, ...]
    fields: dict[str, Field]
    rules: tuple[Rule, ...]


def available_templates() -> list[str]:
    """Names of the template files shipped in ``report_templates/``."""
    return sorted(p.stem for p in TEMPLATE_DIR.glob("*.json"))


def load_templates(name_or_path: str | Path) -> Templates:
    """A shipped template set by name (``"phantom"``, ``"cbis-ddsm"``) or a JSON file, checked whole: a
    malformed file is one line naming the file and the key."""
    path = Path(name_or_path)
    if not path.is_file():
        if path.suffix or len(path.parts) > 1:
            raise MammoInputError(f"report template {path}: no such file")
        if str(name_or_path) not in available_templates():
            raise MammoInputError(f"report template {name_or_path!r}: not one of {', '.join(available_templates())} "
                                  "(or give a JSON file)")
        path = TEMPLATE_DIR / f"{name_or_path}.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise MammoInputError(f"report template {path.name}: unreadable ({exc})") from None
    except json.JSONDecodeError as exc:
        raise MammoInputError(f"report template {path.name}: not JSON (line {exc.lineno}, column {exc.colno}: "
                              f"{exc.msg})") from None
    return _parse(data, path)


def _parse(data: Any, path: Path) -> Templates:
    def bad(key: str, problem: str) -> MammoInputError:
        return MammoInputError(f"report template {path.name}: key {key!r}: {problem}")

    def strings(value: Any, key: str, empty: bool = False, one: bool = False) -> tuple[str, ...]:
        value = [value] if one and isinstance(value, str) else value  # "from": "density" means ["density"]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value) or not (value or empty):
            raise bad(key, "must be a list of strings" + ("" if empty else ", not empty"))
        return tuple(value)

    if not isinstance(data, dict):
        raise bad("(top)", "must be a JSON object")
    unknown, missing = sorted(set(data) - _TOP_KEYS), sorted(_TOP_KEYS - {"about"} - set(data))
    if unknown:
        raise bad(unknown[0], f"unknown key (known: {', '.join(sorted(_TOP_KEYS))})")
    if missing:
        raise bad(missing[0], "missing")
    if data["format"] != FORMAT:
        raise bad("format", f"must be {FORMAT}")
    if data["reader"] not in READERS:
        raise bad("reader", f"must be one of {', '.join(READERS)}")
    if not isinstance(data["fields"], dict) or not data["fields"]:
        raise bad("fields", "must be a non-empty object")
    fields = {name: _parse_field(name, spec, bad, strings) for name, spec in data["fields"].items()}
    if not isinstance(data["sentences"], list) or not data["sentences"]:
        raise bad("sentences", "must be a non-empty list")
    rules = tuple(_parse_rule(f"sentences[{i}]", spec, fields, bad, strings)
                  for i, spec in enumerate(data["sentences"]))
    return Templates(path.stem, path, data["reader"], strings(data["detect"], "detect"), fields, rules)


def _parse_field(name: str, spec: Any, bad: Any, strings: Any) -> Field:
    key = f"fields.{name}"
    if not isinstance(spec, dict):
        raise bad(key, "must be an object")
    unknown = sorted(set(spec) - _FIELD_KEYS)
    if unknown:
        raise bad(f"{key}.{unknown[0]}", f"unknown key (known: {', '.join(sorted(_FIELD_KEYS))})")
    if "from" not in spec:
        raise bad(f"{key}.from", "missing (the column, or columns, holding this attribute)")
    scope = spec.get("scope", "image")
    if scope not in SCOPES:
        raise bad(f"{key}.scope", f"must be one of {', '.join(SCOPES)}")
    if ("values" in spec) == ("number" in spec):
        raise bad(key, "needs exactly one of 'values' (phrasings per value) and 'number' (format strings)")
    values, number = None, ()
    if "values" in spec:
        if not isinstance(spec["values"], dict) or not spec["values"]:
            raise bad(f"{key}.values", "must be a non-empty object of value -> list of phrasings")
        values = {raw.strip().casefold(): strings(options, f"{key}.values.{raw}", empty=True)
                  for raw, options in spec["values"].items()}
    else:
        number = strings(spec["number"], f"{key}.number")
        for i, text in enumerate(number):
            try:
                text.format(1.5)
            except (ValueError, IndexError, KeyError) as exc:
                raise bad(f"{key}.number[{i}]", f"not a format string for one number ({exc})") from None
    split = spec.get("split")
    if split is not None and (not isinstance(split, str) or not split):
        raise bad(f"{key}.split", "must be a non-empty string (the separator of combined values)")
    blank = strings(spec.get("blank", list(DEFAULT_BLANK)), f"{key}.blank", empty=True)
    known = tuple(spec.get("values", {}))
    return Field(name, scope, strings(spec["from"], f"{key}.from", one=True), values, known, number, split,
                 frozenset(b.strip().casefold() for b in blank))


def _parse_rule(key: str, spec: Any, fields: dict[str, Field], bad: Any, strings: Any) -> Rule:
    if not isinstance(spec, dict):
        raise bad(key, "must be an object with 'say'")
    unknown = sorted(set(spec) - _RULE_KEYS)
    if unknown:
        raise bad(f"{key}.{unknown[0]}", f"unknown key (known: {', '.join(sorted(_RULE_KEYS))})")
    scope = spec.get("scope", "image")
    if scope not in SCOPES:
        raise bad(f"{key}.scope", f"must be one of {', '.join(SCOPES)}")
    visible = {n for n, f in fields.items() if scope == "finding" or f.scope == "image"}
    when = spec.get("when", {})
    if not isinstance(when, dict):
        raise bad(f"{key}.when", "must be an object of field -> value (or list of values)")
    conditions = {}
    for name, wanted in when.items():
        if name not in visible:
            raise bad(f"{key}.when.{name}", f"not a field this {scope} sentence can see")
        wanted = strings(wanted, f"{key}.when.{name}", one=True)
        known = fields[name].values
        for value in wanted:
            if known is not None and value.casefold() not in known:
                raise bad(f"{key}.when.{name}", f"{value!r} is not a value of field {name!r}")
        conditions[name] = frozenset(v.casefold() for v in wanted)
    say = []
    for i, text in enumerate(strings(spec.get("say"), f"{key}.say")):
        try:
            parts = list(string.Formatter().parse(text))
        except ValueError as exc:
            raise bad(f"{key}.say[{i}]", f"unbalanced braces ({exc})") from None
        slots = {slot for _, slot, _, _ in parts if slot is not None}
        for slot in sorted(slots):
            if slot not in visible:
                raise bad(f"{key}.say[{i}]", f"{{{slot}}} is not a field this {scope} sentence can see")
        if any(spec_ or conv for _, slot, spec_, conv in parts if slot is not None):
            raise bad(f"{key}.say[{i}]", "slots are plain {field} names (format a number in its field)")
        say.append((text, frozenset(slots)))
    return Rule(scope, conditions, tuple(say))


# --- facts: raw attribute values of an image and of each of its findings ---------------------------

@dataclass
class Record:
    """One image: the raw values of its fields (``image``) and of each finding's (``findings``)."""

    path: str
    image: dict[str, str]
    findings: list[dict[str, str]]


def _read(source: dict[str, Any], templates: Templates, scope: str, where: str) -> dict[str, str]:
    """The fields of ``scope`` present in ``source`` (blank values: absent); an unknown value raises."""
    facts = {}
    for field in templates.fields.values():
        if field.scope != scope:
            continue
        for column in field.sources:
            raw = str(source.get(column) if source.get(column) is not None else "").strip()
            if raw.casefold() in field.blank:
                continue
            _check_value(field, raw, column, templates, where)
            facts[field.name] = raw
            break
    return facts


def _check_value(field: Field, raw: str, column: str, templates: Templates, where: str) -> None:
    if field.values is None:
        try:
            ok = math.isfinite(float(raw))
        except ValueError:
            ok = False
        if not ok:
            raise MammoInputError(f"{where}: {column} {raw!r} is not a number (field {field.name!r} of "
                                  f"{templates.path.name})")
        return
    for part in _parts(field, raw):
        if part.casefold() not in field.values:
            known = ", ".join(field.known)
            raise MammoInputError(f"{where}: {column} {part!r} is not a value {templates.path.name} knows "
                                  f"(field {field.name!r}: {known}); add it to the template")


def _parts(field: Field, raw: str) -> list[str]:
    """A combined value's parts in order, once each ("PUNCTATE-PLEOMORPHIC" with split "-")."""
    parts = [p.strip() for p in raw.split(field.split)] if field.split else [raw]
    return list(dict.fromkeys(p for p in parts if p))


def _rows_records(rows: list[dict[str, str]], templates: Templates, where: str) -> list[Record]:
    """``rows`` reader: each row is one finding; rows of one ``path`` are one image (its first row gives
    the image's fields)."""
    records: dict[str, Record] = {}
    for i, row in enumerate(rows):
        at = f"{where} row {i + 2}"
        path = (row.get("path") or "").strip()
        if path not in records:
            records[path] = Record(path, _read(row, templates, "image", at), [])
        finding = _read(row, templates, "finding", at)
        if finding:
            records[path].findings.append(finding)
    return list(records.values())


def _phantom_records(rows: list[dict[str, str]], templates: Templates, where: str,
                     base: Path | None) -> list[Record]:
    """``phantom`` reader: one row per image, its findings from the ``lesions`` JSON. That truth is complete,
    so ``has_mass``/``has_calc`` (yes/no) say what is absent. Each lesion is placed (:func:`_lesion_source`) when
    ``base`` (the CSV's folder) holds the breast mask; both views of one breast share their placement."""
    records, found = [], []
    for i, row in enumerate(rows):
        at = f"{where} row {i + 2}"
        lesions = _lesions(row, at)
        source: dict[str, Any] = dict(row)
        if lesions is not None:
            kinds = {str(lesion.get("kind")) for lesion in lesions}
            source.update(has_mass="yes" if "mass" in kinds else "no", has_calc="yes" if "calc" in kinds else "no")
        records.append(Record(row.get("path", ""), _read(source, templates, "image", at), []))
        if lesions:  # the mask and params are read once per image, not once per lesion
            mask, params = _breast_mask(row, base), _json(row.get("params"))
            found.append([_lesion_source(row, lesion, mask, params, at) for lesion in lesions])
        else:
            found.append([])
    _share_views(rows, found)
    for i, (record, sources) in enumerate(zip(records, found)):
        for source in sources:
            source["region"] = combine_regions(source.get("across"), source.get("updown"))
        record.findings = [_read(source, templates, "finding", f"{where} row {i + 2}") for source in sources]
    return records


def _lesions(row: dict[str, str], where: str) -> list[dict[str, Any]] | None:
    text = (row.get("lesions") or "").strip()
    if not text:
        return None  # truth unknown (a real image in a corpus CSV): no findings and no negatives
    try:
        lesions = json.loads(text)
    except json.JSONDecodeError as exc:
        raise MammoInputError(f"{where}: lesions is not JSON ({exc.msg})") from None
    if not isinstance(lesions, list) or not all(isinstance(lesion, dict) for lesion in lesions):
        raise MammoInputError(f"{where}: lesions must be a JSON list of objects")
    return lesions


def _lesion_source(row: dict[str, str], lesion: dict[str, Any], mask: np.ndarray | None, params: dict[str, Any],
                   where: str) -> dict[str, Any]:
    """A lesion's raw facts: kind, shape, size_mm, label, morphology (calcifications, from ``params``), and
    depth with ``across`` (CC: outer/inner) or ``updown`` (MLO: upper/lower; CC: from the lesion's height)."""
    source = {key: lesion.get(key) for key in ("kind", "shape", "size_mm", "label")}
    drawn = params.get("lesions") or []
    label = lesion.get("label")
    truth = drawn[label - 1] if isinstance(label, int) and 1 <= label <= len(drawn) else {}  # labels count from 1
    source["morphology"] = truth.get("morphology")
    box, view = lesion.get("box"), row.get("view")
    if mask is None or not isinstance(box, list) or len(box) != 4 or view not in ("CC", "MLO"):
        return source  # no outline, no position: a report never guesses one
    tilt = (params.get("breast", {}).get("tilt_deg") or {}).get(view, 0.0)
    spacing = _json(row.get("spacing_mm"))
    spacing = spacing[-2:] if isinstance(spacing, list) and len(spacing) >= 2 else None
    position = lesion_position(box, view, _chest_wall(row, where), mask, tilt, spacing)
    if position is not None:
        source["depth"] = position[1]
        source["across" if view == "CC" else "updown"] = position[0]
        height, thickness = (truth.get("center_zrc_mm") or [None])[0], params.get("thickness_mm")
        if view == "CC" and height is not None and thickness:  # the CC compresses from above: height is up
            zeta = 2 * float(height) / float(thickness) - 1
            source["updown"] = "central" if abs(zeta) <= CENTRAL_HEIGHT else "upper" if zeta > 0 else "lower"
    return source


def _json(text: str | None) -> Any:
    try:
        return json.loads(text) if text else {}
    except json.JSONDecodeError:
        return {}


def _chest_wall(row: dict[str, str], where: str) -> str:
    side = (row.get("chest_wall") or "").strip().lower() or {"L": "left", "R": "right"}.get(
        (row.get("laterality") or "").strip().upper(), "")
    if side not in ("left", "right"):
        raise MammoInputError(f"{where}: needs chest_wall (left/right) or laterality (L/R) to place its lesions")
    return side


def _breast_mask(row: dict[str, str], base: Path | None) -> np.ndarray | None:
    name = (row.get("breast_mask") or "").strip()
    if base is None or not name or not (base / name).is_file():
        return None
    from training.phantom.dataset import load_mask

    mask = load_mask(base / name)
    return mask.any(axis=0) if mask.ndim == 3 else mask > 0


def _share_views(rows: list[dict[str, str]], found: list[list[dict[str, Any]]]) -> None:
    """The CC and MLO of one breast describe one lesion (same label): each gets the side the CC shows and
    the height the CC's truth (else the MLO) gives, so both name the same quadrant."""
    breasts: dict[tuple[str, ...], dict[str, list[dict[str, Any]]]] = {}
    for row, sources in zip(rows, found):
        key = tuple((row.get(c) or "").strip() for c in ("patient_id", "item", "kind", "laterality"))
        if key[0] and row.get("view") in ("CC", "MLO"):
            breasts.setdefault(key, {}).setdefault(row["view"], []).extend(sources)
    for views in breasts.values():
        mlo = {source["label"]: source for source in views.get("MLO", [])}
        for cc in views.get("CC", []):
            other = mlo.get(cc["label"])
            if other is not None and cc["label"] is not None:
                across, updown = cc.get("across"), cc.get("updown") or other.get("updown")
                for source in (cc, other):
                    source.update(across=across, updown=updown)


# --- geometry ------------------------------------------------------------------------------------

def lesion_position(box: Iterable[float], view: str, chest_wall: str, breast: np.ndarray, tilt_deg: float = 0.0,
                    spacing_mm: Iterable[float] | None = None) -> tuple[str, str] | None:
    """Where a lesion box ``[row0, col0, row1, col1)`` lies on its breast as a radiologist reads one view:
    ``(region, depth)``. The nipple is the breast-mask point farthest along the nipple axis (``tilt_deg``
    below the horizontal: the phantom's ``params.breast.tilt_deg``); the posterior nipple line runs from it
    along that axis to the chest-wall edge (``chest_wall`` "left"/"right"). Depth: the lesion centre's
    distance from the chest wall in thirds of that line's length (posterior, middle, anterior). Region:
    within :data:`CENTRAL_BAND` of the line's length from it "central" ("retroareolar" in the anterior third);
    above it "outer" on a CC (lateral side at the top) or "upper" on an MLO (axilla at the top), below it
    "inner" or "lower". None for an empty mask or a view that is neither CC nor MLO."""
    mask = np.asarray(breast, bool)
    if view not in ("CC", "MLO") or not mask.any():
        return None
    row0, col0, row1, col1 = (float(v) for v in box)
    if chest_wall == "right":  # the canonical orientation: chest wall on column 0
        mask = mask[:, ::-1]
        col0, col1 = mask.shape[1] - col1, mask.shape[1] - col0
    dy, dx = (float(v) for v in spacing_mm) if spacing_mm is not None else (1.0, 1.0)
    sin, cos = math.sin(math.radians(tilt_deg)), math.cos(math.radians(tilt_deg))
    rows, cols = np.nonzero(mask)
    y, x = (rows + 0.5) * dy, (cols + 0.5) * dx
    along = y * sin + x * cos
    tip = along >= along.max() - max(dy, dx)
    nipple_y, nipple_x = float(y[tip].mean()), float(x[tip].mean())
    lesion_y, lesion_x = (row0 + row1) / 2 * dy, (col0 + col1) / 2 * dx
    share = lesion_x * cos / nipple_x  # of the posterior nipple line's length, nipple_x / cos
    depth = "posterior" if share < 1 / 3 else "middle" if share < 2 / 3 else "anterior"
    offset = (lesion_y - nipple_y) * cos - (lesion_x - nipple_x) * sin  # > 0: below the line
    if abs(offset) <= CENTRAL_BAND * nipple_x / cos:
        return ("retroareolar" if depth == "anterior" else "central"), depth
    if view == "CC":
        return ("outer" if offset < 0 else "inner"), depth
    return ("upper" if offset < 0 else "lower"), depth


def combine_regions(across: str | None, updown: str | None) -> str | None:
    """One region from the side a CC shows (outer/inner/central/retroareolar) and the height (upper/lower/
    central/retroareolar: an MLO, or the CC's truth): a quadrant when both are off the nipple line, the
    one that is when the other is on it, central (retroareolar when either says so) when both are."""
    central = ("central", "retroareolar")
    if across is None or updown is None:
        return across or updown
    if across in central and updown in central:
        return "retroareolar" if "retroareolar" in (across, updown) else "central"
    if across in central or updown in central:
        return updown if across in central else across
    return QUADRANTS[(updown, across)]


# --- rendering -----------------------------------------------------------------------------------

def _phrase(field: Field, raw: str, rng: np.random.Generator) -> str | None:
    if field.values is None:
        return field.number[int(rng.integers(len(field.number)))].format(float(raw))
    words = []
    for part in _parts(field, raw):
        options = field.values[part.casefold()]
        if not options:
            return None  # a value only conditions test ("has_mass": "no"), never said
        words.append(options[int(rng.integers(len(options)))])
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def _holds(rule: Rule, facts: dict[str, str], templates: Templates) -> bool:
    for name, wanted in rule.when.items():
        raw = facts.get(name)
        if raw is None or not ({raw.casefold()} | {p.casefold() for p in _parts(templates.fields[name], raw)}) & wanted:
            return False
    return True


def _sentence(rule: Rule, facts: dict[str, str], templates: Templates, rng: np.random.Generator) -> str | None:
    """One phrasing of ``rule`` among those that state the most of the facts present: every phrasing
    whose fields are all present, less those naming a strict subset of another's fields."""
    usable = [(text, slots) for text, slots in rule.say if slots <= facts.keys()]
    best = [(text, slots) for text, slots in usable if not any(slots < other for _, other in usable)]
    if not best:
        return None
    text, slots = best[int(rng.integers(len(best)))]
    words = {name: _phrase(templates.fields[name], facts[name], rng) for name in sorted(slots)}
    if any(word is None for word in words.values()):
        return None
    sentence = _articles(" ".join(text.format(**words).split()))
    return sentence[:1].upper() + sentence[1:]


_ARTICLE = re.compile(r"(^A|\ba) (?=([A-Za-z0-9][\w.-]*))")  # "A" only opens a sentence: "ACR A dense"


def _articles(text: str) -> str:
    """'a' before a vowel sound becomes 'an' ("an oval mass", "an 8 mm mass", "an MLO view")."""
    def fix(match: re.Match) -> str:
        word = match.group(2)
        integer = re.match(r"\d+", word)
        vowel = (word[0].lower() in "aeio" if not integer else
                 integer.group(0).startswith("8") or integer.group(0) in ("11", "18"))
        if len(word) > 1 and word.isupper() and word.isalpha():
            vowel = word[0] in "AEFHILMNORSX"  # said letter by letter
        return f"{match.group(1)}n " if vowel else match.group(0)

    return _ARTICLE.sub(fix, text)


def _render(record: Record, templates: Templates, rng: np.random.Generator) -> list[str]:
    """The sentences of one image: rules in file order; a run of finding rules is said finding by finding."""
    sentences = []
    for scope, block in groupby(templates.rules, key=lambda rule: rule.scope):
        rules = list(block)
        contexts = [record.image] if scope == "image" else [{**record.image, **f} for f in record.findings]
        for facts in contexts:
            for rule in rules:
                sentence = _sentence(rule, facts, templates, rng) if _holds(rule, facts, templates) else None
                if sentence:
                    sentences.append(sentence)
    return sentences


# --- the API -------------------------------------------------------------------------------------

def _as_templates(templates: Templates | str | Path) -> Templates:
    return templates if isinstance(templates, Templates) else load_templates(templates)


def report_sentences(row: dict[str, Any], templates: Templates | str | Path, rng: np.random.Generator,
                     base: str | Path | None = None) -> list[str]:
    """The sentences of one labels row (``base``: the folder its mask paths are relative to; without it a
    phantom lesion gets no position). A CSV with several rows per image, or both views of a breast, is
    better read whole with :func:`reports_for_csv`."""
    templates = _as_templates(templates)
    row = {k: "" if v is None else (v if isinstance(v, str) else json.dumps(v)) for k, v in row.items()}
    records = (_phantom_records([row], templates, "row", Path(base) if base is not None else None)
               if templates.reader == "phantom" else _rows_records([row], templates, "row"))
    return _render(records[0], templates, rng)


def detect_templates(columns: Iterable[str], where: str = "labels CSV") -> Templates:
    """The one shipped template set whose ``detect`` columns ``columns`` all has."""
    columns = set(columns)
    fits = [load_templates(name) for name in available_templates()]
    fits = [t for t in fits if set(t.detect) <= columns]
    if len(fits) != 1:
        wanted = "; ".join(f"{t.name}: {', '.join(t.detect)}" for t in map(load_templates, available_templates()))
        problem = "no report template fits its columns" if not fits else \
            f"several report templates fit ({', '.join(t.name for t in fits)}); choose one"
        raise MammoInputError(f"{where}: {problem} ({', '.join(sorted(columns))}); templates need {wanted}")
    return fits[0]


def image_seed(seed: int, path: str) -> np.random.SeedSequence:
    """The random stream of one image's report: from the seed and its path, whatever the row order."""
    return np.random.SeedSequence([int(seed), zlib.crc32(path.encode("utf-8"))])


def reports_for_csv(csv: str | Path, templates: Templates | str | Path | None = None,
                    seed: int = 0) -> list[dict[str, Any]]:
    """``[{"path", "sentences", "report"}]``, one per image of the labels CSV ``csv``, in CSV order.
    ``templates`` None: the shipped set whose columns the CSV has (:func:`detect_templates`)."""
    csv = Path(csv)
    rows = read_rows(csv, option="--data")
    where = csv.name
    if templates is None:
        chosen = detect_templates(rows[0].keys(), where)
    else:
        chosen = _as_templates(templates)
        missing = [c for c in chosen.detect if c not in rows[0]]
        if missing:
            raise MammoInputError(f"{where}: report template {chosen.path.name} needs column(s) "
                                  f"{', '.join(missing)}; the CSV has {', '.join(sorted(rows[0]))}")
    records = (_phantom_records(rows, chosen, where, csv.parent) if chosen.reader == "phantom"
               else _rows_records(rows, chosen, where))
    out = []
    for record in records:
        sentences = _render(record, chosen, np.random.default_rng(image_seed(seed, record.path)))
        out.append({"path": record.path, "sentences": sentences, "report": " ".join(sentences)})
    return out


__all__ = ["CENTRAL_BAND", "CENTRAL_HEIGHT", "TEMPLATE_DIR", "Templates", "available_templates", "combine_regions",
           "detect_templates", "image_seed", "lesion_position", "load_templates", "report_sentences", "reports_for_csv"]

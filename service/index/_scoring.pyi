"""Type stub of the C extension service/index/_scoring.c."""

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

def inner_products(
    queries: npt.NDArray[np.float32], rows: npt.NDArray[np.float32], out: npt.NDArray[Any]
) -> None: ...
def inner_products_panels(
    queries: npt.NDArray[np.float32], panels: npt.NDArray[np.float32], n: int, out: npt.NDArray[Any]
) -> None: ...
def select_best(
    scores: npt.NDArray[np.float32],
    iids: npt.NDArray[np.int64],
    k: int,
    out_scores: npt.NDArray[np.float32],
    out_iids: npt.NDArray[np.int64],
    out_count: npt.NDArray[np.int64],
    out_bound: npt.NDArray[np.float32],
) -> None: ...
Ids = npt.NDArray[np.int64]

def ivf_search(
    queries: npt.NDArray[np.float32],
    lists: npt.NDArray[np.int64],
    shards: Sequence[tuple[npt.NDArray[np.float32], Ids, Ids, Ids]],
    banned_keys: npt.NDArray[np.int64],
    k: int,
    floors: npt.NDArray[np.float32],
    out_scores: npt.NDArray[np.float32],
    out_iids: npt.NDArray[np.int64],
    out_count: npt.NDArray[np.int64],
    out_bound: npt.NDArray[np.float32],
) -> None: ...

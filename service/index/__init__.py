"""The item index: max inner product over rows [v; b], exact or IVF, sharded, with snapshots.

`VectorIndex` (vector_index.py) is the interface; base.py, storage.py, search.py, ivf_lists.py and
snapshot.py are its parts, and _scoring.c / _ivf_scan.c its C kernels (`service.index._scoring`).
"""

from service.index.search import Hit
from service.index.storage import IndexConfig
from service.index.vector_index import VectorIndex

__all__ = ["Hit", "IndexConfig", "VectorIndex"]

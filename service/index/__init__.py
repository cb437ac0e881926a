"""The item index on FAISS: each query's best k trained items and best k new items, by h·v + b.

`VectorIndex` (vector_index.py) is the interface; `IndexConfig` (config.py) chooses each population's
FAISS index by size; segment.py builds and searches one FAISS index, ids.py is the id side table,
snapshot.py the files.
"""

from service.index.config import IndexConfig
from service.index.vector_index import Hit, Tops, VectorIndex

__all__ = ["Hit", "IndexConfig", "Tops", "VectorIndex"]

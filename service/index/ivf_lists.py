"""One IVF shard's rows, list by list, in the layout the scan kernel reads (service/index/_ivf_scan.c).

List l's rows fill panels starts[l] .. starts[l+1] (16 rows a panel, `index_storage.to_panels`),
the last panel padded with zero rows whose slot id is -1. The rows are the index's [v; b] as
stored: the kernel's scores are then exact inner products, equal to the exact segments' bit for
bit. (The lifted rows the lists were trained on are needed only to assign a row to its list.)

Written once when a shard is built, never mutated: searches read it without a lock.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from service.index.storage import PANEL, Ids, Vectors

_FILES = ("panels", "starts", "rows", "slot_iids")
_CHUNK = 4096  # panels laid out per step of a build (65,536 rows)


@dataclass(frozen=True)
class ListPanels:
    panels: Vectors  # (P, D+1, 16)
    starts: Ids  # (nlist+1,) first panel of each list
    rows: Ids  # (nlist,) rows in each list
    slot_iids: Ids  # (16P,) the internal id in each panel slot, -1 for padding

    @classmethod
    def build(cls, iids: Ids, rows: Vectors, lists: Ids, nlist: int, chunk: int = _CHUNK) -> ListPanels:
        """From ids (n,), rows (n, D+1) and list numbers (n,), grouped by list (lists ascending);
        `chunk` panels are laid out per step, so the build never holds the rows twice more."""
        n, dim = rows.shape
        counts = np.bincount(lists, minlength=nlist)  # (nlist,)
        starts = np.zeros(nlist + 1, np.int64)
        np.cumsum(-(-counts // PANEL), out=starts[1:])
        first_row = np.cumsum(counts) - counts  # each list's first row among the grouped rows
        slots = starts[lists] * PANEL + np.arange(n) - first_row[lists]  # (n,) each row's slot
        slot_iids = np.full(int(starts[-1]) * PANEL, -1, np.int64)
        slot_iids[slots] = iids
        panels = np.empty((int(starts[-1]), dim, PANEL), np.float32)  # (P, D+1, 16)
        for p0 in range(0, len(panels), chunk):
            p1 = min(p0 + chunk, len(panels))
            r0, r1 = np.searchsorted(slots, [p0 * PANEL, p1 * PANEL])  # slots ascend with the rows
            padded = np.zeros(((p1 - p0) * PANEL, dim), np.float32)
            padded[slots[r0:r1] - p0 * PANEL] = rows[r0:r1]
            panels[p0:p1] = padded.reshape(-1, PANEL, dim).transpose(0, 2, 1)
        return cls(panels, starts, counts.astype(np.int64), slot_iids)

    @property
    def nlist(self) -> int:
        return len(self.rows)

    @property
    def kernel_args(self) -> tuple[Vectors, Ids, Ids, Ids]:
        return self.panels, self.starts, self.rows, self.slot_iids

    def contents(self) -> tuple[Ids, Vectors, Ids]:
        """(ids (n,), rows (n, D+1), list numbers (n,)), grouped by list."""
        dim = self.panels.shape[1]
        held = self.slot_iids >= 0
        rows = self.panels.transpose(0, 2, 1).reshape(-1, dim)[held]  # (n, D+1)
        lists = np.repeat(np.arange(self.nlist, dtype=np.int64), self.rows)
        return self.slot_iids[held], rows, lists

    def save(self, prefix: Path) -> list[Path]:
        """Write `{prefix}-{part}.npy` files; returns their paths."""
        paths = [prefix.with_name(f"{prefix.name}-{name}.npy") for name in _FILES]
        arrays: tuple[npt.NDArray[np.generic], ...] = self.kernel_args
        for path, array in zip(paths, arrays, strict=True):
            np.save(path, array)
        return paths

    @classmethod
    def load(cls, prefix: Path) -> ListPanels:
        panels, starts, rows, slot_iids = (np.load(prefix.with_name(f"{prefix.name}-{name}.npy")) for name in _FILES)
        if panels.ndim != 3 or panels.shape[2] != PANEL or len(starts) != len(rows) + 1 or \
                len(slot_iids) != len(panels) * PANEL or starts[-1] != len(panels):
            raise ValueError(f"{prefix}: IVF list files do not fit together")
        return cls(panels, starts, rows, slot_iids)

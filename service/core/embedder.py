"""The rows [v; b] (D+1) of one model version: trained (warm) items' learned rows from the artifact,
and for every other item the generator's row under the user-neutral gate, from its raw inputs. With
the collaborative part (service/model/collaborative.py) a row is [v; b; y] (D+1+f): y the trained
item's ALS factors, or the ridge map's from the item's raw inputs.

A replica uses a stored embedding only when it was computed by the model version it serves;
otherwise it re-embeds the item from its raw inputs, so replicas on two versions never mix rows.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import numpy as np
import numpy.typing as npt
import torch

from service.core.fusion_gate import ItemFactors
from service.core.types import InvalidItemError, NewItem, Rows
from service.model import AttributeVocabulary, ItemInputs, M2Rec, ModelConfig, item_inputs
from service.model.artifact import Artifact, ArtifactError, check_compatible
from service.model.generator import M2VAEGenerator
from service.store import ItemRecord

log = logging.getLogger(__name__)
EMBED_CHUNK = 128  # items per generator forward pass (sorted by attribute count: little padding)


def load_model(artifact: Artifact) -> M2Rec:
    """The model rebuilt from the artifact's config, weights loaded, in eval mode without gradients."""
    manifest = artifact.manifest
    cfg = ModelConfig(**manifest.model_args)  # type: ignore[arg-type]  # JSON values, checked by the dataclass
    facts = {
        "content_dim": (cfg.content_dim, manifest.content_dim),
        "embedding_dim": (cfg.row_dim, manifest.embedding_dim),
        "n_warm": (cfg.n_warm, len(artifact.item_ids)),
        "n_attributes": (cfg.n_attributes, len(manifest.attribute_vocabulary)),
    }
    for name, (model_value, manifest_value) in facts.items():
        if model_value != manifest_value:
            raise ArtifactError(f"artifact at {artifact.path}: model config gives {name}={model_value} "
                                f"but the manifest says {manifest_value}; re-export the model")
    model = M2Rec(cfg)
    check_compatible(artifact, {name: tuple(t.shape) for name, t in model.state_dict().items()})
    model.load_state_dict(dict(artifact.tensors))
    model.eval()
    model.requires_grad_(False)
    return model


class Embedder:
    """One artifact's model: the items it was trained on, and rows for every item it was not."""

    def __init__(self, artifact: Artifact) -> None:
        self.version = artifact.version
        self.model = load_model(artifact)
        self.vocabulary = AttributeVocabulary(artifact.manifest.attribute_vocabulary)
        self.content_dim = artifact.manifest.content_dim
        self.dim = artifact.manifest.embedding_dim
        with torch.inference_mode():
            self.warm_rows: Rows = self.model.index_rows().numpy().astype(np.float32)  # (J, D+1[+f])
        self.warm_ids = artifact.item_ids
        self.warm_pos = {item_id: j for j, item_id in enumerate(self.warm_ids)}
        # items the training data had interactions for but the model was not trained on (evaluation
        # items): served from generated rows like new items, but they are not new
        self.held_out = frozenset(artifact.manifest.held_out_items)
        if self.held_out:
            log.warning("model %s was trained without %d items of its dataset that have interactions (held out "
                        "for evaluation): registering them serves them as new items, flagged held_out and not "
                        "counted as new in m2rec_recommended_items_total", self.version, len(self.held_out))

    def is_trained(self, item_id: str) -> bool:
        return item_id in self.warm_pos

    def problem(self, item: NewItem) -> str | None:
        """Why this model cannot embed the item, or None."""
        if item.content is not None:
            if self.content_dim == 0:
                return (f"item {item.item_id}: model version {self.version} takes no content vector; "
                        f"omit content")
            if len(item.content) != self.content_dim:
                return (f"item {item.item_id}: content has {len(item.content)} values but model version "
                        f"{self.version} expects content_dim={self.content_dim}")
            # float32 is what the model computes in: 3.5e38 is finite as float64 but inf as float32
            if not np.isfinite(np.asarray(item.content, dtype=np.float64).astype(np.float32)).all():
                return (f"item {item.item_id}: content contains NaN, infinite or beyond-float32 values "
                        f"(|x| > {np.finfo(np.float32).max:.8g})")
        elif not any(t in self.vocabulary.index for t in item.attributes):
            return (f"item {item.item_id}: none of its attributes is known to model version {self.version} "
                    f"and it has no content, so there is nothing to embed it from; add content or known "
                    f"attributes")
        return None

    def unknown_attributes(self, attributes: Iterable[str]) -> list[str]:
        return [t for t in attributes if t not in self.vocabulary.index]

    def embed(self, items: Sequence[NewItem]) -> Rows:
        """Generated rows (B, D+1), neutral gate; InvalidItemError (naming every bad item) before any work,
        and after it for an item whose row is not finite: such a row would reach the store and the index
        and make every score it takes part in NaN."""
        problems = [p for p in map(self.problem, items) if p is not None]
        if problems:
            raise InvalidItemError("; ".join(problems[:20]))
        rows = self._embed(items)
        broken = np.flatnonzero(~np.isfinite(rows).all(axis=1))
        if broken.size:
            names = [items[b].item_id for b in broken[:10].tolist()]
            raise InvalidItemError(
                f"items {names}: the model computes a non-finite row from their inputs ({broken.size} of "
                f"{len(items)}); nothing was written; check their content for extreme values")
        return rows

    def _embed(self, items: Sequence[NewItem]) -> Rows:
        # Attribute pooling pads every item of a pass to the widest one's attribute count (B, A, H):
        # passes of items of similar width (sorted by it) keep that padding small.
        index = self.vocabulary.index
        widths = [len({t for t in item.attributes if t in index}) for item in items]
        order = sorted(range(len(items)), key=widths.__getitem__)
        out = np.empty((len(items), self.dim), np.float32)  # (B, D+1[+f])
        for s in range(0, len(order), EMBED_CHUNK):
            chunk = order[s : s + EMBED_CHUNK]
            out[chunk] = self._embed_chunk([items[j] for j in chunk])
        return out

    def _inputs(self, items: Sequence[NewItem]) -> ItemInputs:
        attributes, _ = self.vocabulary.encode([item.attributes for item in items])  # (B, A)
        content = np.zeros((len(items), max(self.content_dim, 1)), np.float32)  # (B, F)
        has_content = np.zeros(len(items), dtype=bool)  # (B,)
        for b, item in enumerate(items):
            if item.content is not None:
                content[b] = item.content
                has_content[b] = True
        return item_inputs(attributes, torch.from_numpy(content), self.content_dim, torch.from_numpy(has_content))

    def _embed_chunk(self, items: Sequence[NewItem]) -> Rows:
        return self.rows_of(self._inputs(items))

    def rows_of(self, inputs: ItemInputs) -> Rows:
        """Rows (B, D+1[+f]) of items from their model inputs, neutral gate."""
        # inference_mode is per thread, and requests arrive on pool threads: entered per call
        with torch.inference_mode():
            rows, _ = self.model.embed_items(inputs)
        part = self.model.collaborative
        if part is None:
            return rows.numpy().astype(np.float32)  # (B, D+1)
        y = part.rows(inputs.content.numpy(), inputs.has_content.numpy(), inputs.attributes.numpy())  # (B, f)
        return np.hstack([rows.numpy(), y]).astype(np.float32)  # (B, D+1+f)

    def fusion_factors(self, items: Sequence[NewItem], top: int) -> list[tuple[ItemFactors, list[tuple[str, float]]]]:
        """Per item: what M2VAE's fusion gate reads of it (service/core/fusion_gate.py) and its `top`
        attribute tokens by attention weight (over its own tokens; no user enters the attention).
        [] from a generator without a user-aware fusion (the content-VAE baseline)."""
        generator = self.model.generator
        if not items or not isinstance(generator, M2VAEGenerator):
            return []
        with torch.inference_mode():
            inputs = self._inputs(items)
            out, _, _ = generator._encode(inputs, None)  # the views alone: no decoder, no ridge path
        mu_a, mu_c = out.views["a"].mu.numpy(), out.views["c"].mu.numpy()  # (B, Z) each
        common = None if out.common is None else out.common.mu.numpy()  # (B, Z)
        has = torch.stack([out.view_mask["a"], out.view_mask["c"]], dim=1).tolist()  # (B, 2)
        attention = out.gates["attention"].tolist()  # (B, A), over the item's sorted known token ids
        ids = inputs.attributes.tolist()  # (B, A) vocabulary index + 1, 0 = padding
        tokens = self.vocabulary.tokens
        result = []
        for b in range(len(items)):
            factors = ItemFactors(mu_a[b].copy(), mu_c[b].copy(), None if common is None else common[b].copy(),
                                  (bool(has[b][0]), bool(has[b][1])))
            weighted = sorted(((tokens[i - 1], w) for i, w in zip(ids[b], attention[b], strict=True) if i > 0),
                              key=lambda tw: (-tw[1], tw[0]))
            result.append((factors, weighted[:top]))
        return result

    def record_rows(self, records: Sequence[ItemRecord]) -> dict[str, npt.NDArray[np.float32]]:
        """Rows of stored items under this model; items it cannot embed are left out (and logged)."""
        current = [r for r in records if r.model_version == self.version]
        rows = {r.item_id: r.embedding for r in current if np.isfinite(r.embedding).all()}
        stale = [NewItem(r.item_id, r.attributes, r.content) for r in records if r.model_version != self.version]
        usable = [item for item in stale if self.problem(item) is None]
        if usable:
            generated = self._embed(usable)
            finite = set(np.flatnonzero(np.isfinite(generated).all(axis=1)).tolist())  # rows with no NaN or inf
            rows.update((i.item_id, generated[b]) for b, i in enumerate(usable) if b in finite)
        left_out = len(records) - len(rows)
        if left_out:  # written before the store refused such items, or inputs this model cannot use
            log.warning("%d stored items cannot be embedded by model %s (unusable inputs or a non-finite "
                        "row) and are not served", left_out, self.version)
        return rows

"""The one model definition and the one artifact format, shared by the trainer and the service.

`training` imports this package; nothing here imports `training`, the service's API or a store.
The artifact format is `service.model.artifact` (read) and `service.model.artifact_export` (write).
"""

from service.model.config import GENERATORS, ModelConfig
from service.model.inputs import ItemInputs
from service.model.model import AttributeVocabulary, M2Rec, item_inputs

__all__ = ["GENERATORS", "AttributeVocabulary", "ItemInputs", "M2Rec", "ModelConfig", "item_inputs"]

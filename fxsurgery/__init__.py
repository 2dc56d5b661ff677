"""fxsurgery: carry trained weights into a modified network, by propagating label sets
through its torch.fx graph ("Neural Network Surgery with Sets", Raiman, Zhang, Dennison 2019)."""
from .labels import Categories, Features, Label
from .capture import CaptureError, InputError, Traced, trace
from .propagate import RuleError, UnknownOperatorWarning
from .interaction_map import InteractionMap, compare, interaction_map
from .rules import REGISTRY

__all__ = ["Features", "Categories", "Label", "trace", "Traced", "interaction_map", "InteractionMap",
           "compare", "REGISTRY", "CaptureError", "InputError", "RuleError", "UnknownOperatorWarning"]
__version__ = "0.1.0"

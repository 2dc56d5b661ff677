"""fxsurgery: carry trained weights into a modified network, by propagating label sets
through its torch.fx graph ("Neural Network Surgery with Sets", Raiman, Zhang, Dennison 2019)."""
from .labels import Categories, Features, Label
from .capture import CaptureError, InputError, Traced, trace
from .propagate import RuleError, UnknownOperatorWarning
from .interaction_map import InteractionMap, compare, interaction_map
from .rules import REGISTRY
from .gradient_map import GradientMapError, gradient_dependence, gradient_interaction_map
from .surgery import SurgeryError, SurgeryPlan, SurgeryWarning, plan, transplant, verify
from . import passes  # noqa: F401  (fs.passes.add_features, ...)
from . import hf  # noqa: F401  (fs.hf.resize; transformers is imported when it is called)

__all__ = ["Features", "Categories", "Label", "trace", "Traced", "interaction_map", "InteractionMap",
           "compare", "REGISTRY", "CaptureError", "InputError", "RuleError", "UnknownOperatorWarning",
           "gradient_interaction_map", "gradient_dependence", "GradientMapError",
           "plan", "verify", "transplant", "SurgeryPlan", "SurgeryError", "SurgeryWarning"]
__version__ = "0.1.0"

"""Rewriting passes: the modified model made from the old one, with no new model code.

    gm = fs.passes.add_features(fs.trace(model, inputs, features), "obs", ["armor", "speed"])
    gm = fs.passes.widen(gm, "core", 4096)         # a pass's output goes into the next pass
    fs.verify(gm.meta["fxsurgery"].plan)           # this pass: the old and new model on random inputs
    fs.verify(gm.meta["fxsurgery"].composite())    # the chain: its first model against this one

Modules: sizing (which positions of every value hold which members of a label class),
placing (a new order placed in them: the new sizes), reach (every class a change drags along
and the new shape of every value), graph (the new GraphModule: resized parameters,
re-specialised literal shapes, the shape check), core (trace -> reach -> rewrite -> plan ->
apply), resize (features, categories, units), structure (inserted layers, attention heads),
infra (the passes as torch.fx pass-infrastructure citizens), record (what a pass leaves in
gm.meta), arguments (the checks of the passes' arguments).
"""
from .core import PassError, as_traced
from .arguments import PassTypeError
from .record import PassRecord
from .resize import (add_categories, add_features, prune_units, remove_features, reorder_features,
                     unit_groups, widen)
from .sizing import Order, SizingError
from .structure import add_heads, insert_identity_layer
from .infra import (AddCategories, AddFeatures, AddHeads, InsertIdentityLayer, InteractionMapPass, PruneUnits,
                    RemoveFeatures, ReorderFeatures, RewritePass, Widen, rewrite_pass)

__all__ = ["add_features", "remove_features", "reorder_features", "add_categories", "widen", "prune_units",
           "unit_groups", "insert_identity_layer", "add_heads", "PassError", "PassTypeError", "PassRecord", "SizingError", "Order", "as_traced",
           "InteractionMapPass", "RewritePass", "rewrite_pass", "AddFeatures", "RemoveFeatures", "ReorderFeatures",
           "AddCategories", "Widen", "PruneUnits", "InsertIdentityLayer", "AddHeads"]

"""Rewriting passes: the modified model made from the old one, with no new model code.

    gm = fs.passes.add_features(fs.trace(model, inputs, features), "obs", ["armor", "speed"])
    gm = fs.passes.widen(gm, "core", 4096)         # a pass's output goes into the next pass
    fs.verify(gm.meta["fxsurgery"].plan)           # this pass: the old and new model on random inputs
    fs.verify(gm.meta["fxsurgery"].composite())    # the chain: its first model against this one

Modules: layouts (which positions of every value hold which members of a label class),
new_layouts (a new order placed in a layout: the new parts and sizes), new_shapes (every class
a change drags along and the new shape of every value), new_module (the new GraphModule:
resized parameters, re-specialised literal shapes, the shape check), driver (the path every
resizing pass shares: trace -> new shapes -> new module -> plan -> apply), resize (features,
categories, units), identity_layer (a layer inserted as the identity), heads (attention heads
added), batch (the batch size freed again), infra (the passes as torch.fx pass-infrastructure
citizens), record (what a pass leaves in gm.meta), arguments (the checks of the passes'
arguments).
"""
from .driver import PassError, as_traced
from .arguments import PassTypeError
from .record import PassRecord
from .resize import (add_categories, add_features, prune_units, remove_features, reorder_features,
                     unit_groups, widen)
from .layouts import Order, SizingError
from .identity_layer import insert_identity_layer
from .heads import add_heads
from .infra import (AddCategories, AddFeatures, AddHeads, InsertIdentityLayer, InteractionMapPass, PruneUnits,
                    RemoveFeatures, ReorderFeatures, RewritePass, Widen, rewrite_pass)

__all__ = ["add_features", "remove_features", "reorder_features", "add_categories", "widen", "prune_units",
           "unit_groups", "insert_identity_layer", "add_heads", "PassError", "PassTypeError", "PassRecord", "SizingError", "Order", "as_traced",
           "InteractionMapPass", "RewritePass", "rewrite_pass", "AddFeatures", "RemoveFeatures", "ReorderFeatures",
           "AddCategories", "Widen", "PruneUnits", "InsertIdentityLayer", "AddHeads"]

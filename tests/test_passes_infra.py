"""The analysis and the rewrites as torch.fx pass-infrastructure citizens (fxsurgery.passes.infra):
PassManager pipelines mixing them with torch's own passes and hand-written ones, the labels they
write into node.meta, function preservation, and the user's model left untouched."""
import copy

import pytest
import torch
import torch.fx
import torch.nn as nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult
from torch.fx.passes.infra.pass_manager import PassManager
from torch.fx.passes.shape_prop import ShapeProp

import fxsurgery as fs
from helpers import SelfAttention as Attention
from helpers import TwoLayer as MLP
from fxsurgery.passes import (AddCategories, AddFeatures, InsertIdentityLayer, InteractionMapPass, PassError,
                              PruneUnits, RemoveFeatures, ReorderFeatures, Widen)
from fxsurgery.passes.infra import INPUT, KEY_LABELS, LABELS, MAP, match_nodes, traced_source

TOL = 1e-5
OBS = ["hp", "mana", "x", "y"]
FEATS = tuple(f"obs:{n}" for n in OBS)
aten = torch.ops.aten


pytestmark = pytest.mark.usefixtures("quiet")




def setup(seed=0):
    torch.manual_seed(seed)
    model = MLP().eval()
    inputs = {"obs": torch.randn(2, 4)}
    return model, inputs, {"obs": fs.Features(OBS)}


def exported(model, inputs):
    """The GraphModule a compiler pipeline typically holds: torch.export's, unlifted."""
    return torch.export.export(model, tuple(inputs.values())).module()


def node(gm, name):
    return next(n for n in gm.graph.nodes if n.name == name)


def units(group, n):
    return tuple(f"{group}[{i}]" for i in range(n))


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def unchanged(model, before):
    sd = model.state_dict()
    return sd.keys() == before.keys() and all(torch.equal(before[k], v) for k, v in sd.items())


def preserved(p):
    assert p.preserves_function, [str(i) for i in p.issues]
    v = fs.verify(p)
    assert v.max <= TOL, str(v)
    return v


def test_a_pipeline_labels_adds_features_widens_and_preserves_the_function():
    model, inputs, features = setup()
    before = snapshot(model)
    gm = exported(model, inputs)
    first, add, widen, last = (InteractionMapPass(inputs, features), AddFeatures("obs", ["armor", "speed"], at="mana"),
                               Widen("fc1", by=4), InteractionMapPass())
    result = PassManager([first, add, widen, last])(gm)
    assert isinstance(result, PassResult) and result.modified

    # The analysis labelled the graph it was given, in place, exactly.
    assert first.unmatched == []
    assert node(gm, "fc1_weight").meta[LABELS] == FEATS          # the first Linear meets the inputs
    assert node(gm, "fc1_bias").meta[LABELS] == ()               # a bias meets nothing
    assert node(gm, "fc2_weight").meta[LABELS] == FEATS          # ... transitively
    assert node(gm, "fc2_weight").meta[KEY_LABELS] == units("fc1", 8) + units("fc2", 3)
    assert node(gm, "fc1_bias").meta[KEY_LABELS] == units("fc1", 8)
    assert node(gm, "obs").meta[LABELS] == FEATS
    assert node(gm, "linear").meta[LABELS] == FEATS and node(gm, "linear").meta[KEY_LABELS] == units("fc1", 8)
    assert set(node(gm, "linear").meta["fxsurgery"]) == {"deps", "keys"}   # the raw label tensors
    assert node(gm, "obs").meta[INPUT]["name"] == "obs"
    assert isinstance(gm.meta[MAP], fs.InteractionMap) and gm.meta[MAP] is first.map
    assert first.map.labels_of("fc1.weight") == {l for l in first.map.pool.labels if l.kind == "feature"}

    # The rewrites: new shapes, the old weights carried over, the function preserved.
    out = result.graph_module
    assert out is widen.result and add.result is not out
    sd = out.state_dict()
    assert sd["fc1.weight"].shape == (12, 6) and sd["fc2.weight"].shape == (3, 12)
    assert torch.equal(sd["fc1.weight"][:8, [0, 1, 4, 5]], before["fc1.weight"])
    assert torch.count_nonzero(sd["fc1.weight"][:8, 2:4]) == 0 and torch.count_nonzero(sd["fc2.weight"][:, 8:]) == 0
    preserved(add.plan)
    preserved(widen.plan)
    assert out.meta["fxsurgery"]["plan"] is widen.plan
    # End to end: whatever the new features hold, the output is the old model's.
    x = torch.randn(5, 4)
    x_new = torch.cat([x[:, :2], torch.randn(5, 2), x[:, 2:]], 1)
    y_new = out(x_new)
    y_new = y_new[0] if isinstance(y_new, (tuple, list)) else y_new
    torch.testing.assert_close(y_new, model(x), atol=1e-5, rtol=1e-5)

    # The last analysis labelled the final graph: the new features, the new units.
    new_feats = ("obs:hp", "obs:mana", "obs:armor", "obs:speed", "obs:x", "obs:y")
    assert last.unmatched == []
    assert node(out, "fc1_weight").meta[LABELS] == new_feats
    assert node(out, "linear").meta[KEY_LABELS] == units("fc1", 12)
    assert node(out, "fc2_weight").meta[KEY_LABELS] == units("fc1", 12) + units("fc2", 3)
    assert node(out, "linear_1").meta[LABELS] == new_feats

    # The user's model (and the graph module the pipeline started from) are untouched.
    assert unchanged(model, before) and unchanged(gm, before)


def test_the_analysis_of_a_symbolically_traced_module_labels_its_call_module_nodes():
    model, inputs, features = setup()
    gm = torch.fx.symbolic_trace(model)
    res = InteractionMapPass(inputs, features)(gm)
    assert res == PassResult(gm, False)
    # fc1 is one call_module node here; its value is the last ATen node it became.
    assert node(gm, "fc1").meta[LABELS] == FEATS and node(gm, "fc1").meta[KEY_LABELS] == units("fc1", 8)
    assert node(gm, "relu").meta[KEY_LABELS] == units("fc1", 8)
    assert node(gm, "fc2").meta[KEY_LABELS] == units("fc2", 3)
    assert all(LABELS not in n.meta for n in gm.graph.nodes if n.op == "output")


def test_a_pipeline_with_torch_passes_in_between():
    """A user's in-place rewrite (relu -> clamp_min), torch's ShapeProp fed with the example
    inputs the analysis recorded on the placeholders, and a user pass that builds a new
    GraphModule (dropping gm.meta): the fxsurgery passes after them still work, without being
    given the inputs again."""
    model, inputs, features = setup(1)
    before = snapshot(model)
    seen = []

    def relu_to_clamp(gm):
        for n in list(gm.graph.nodes):
            if n.op == "call_function" and n.target == aten.relu.default:
                with gm.graph.inserting_after(n):
                    c = gm.graph.call_function(aten.clamp_min.default, (n.args[0], 0.0))
                n.replace_all_uses_with(c)
                gm.graph.erase_node(n)
                seen.append(c.name)
        gm.recompile()
        return PassResult(gm, bool(seen))

    class ShapePropPass(PassBase):
        def call(self, gm):
            examples = [n.meta[INPUT]["example"] for n in gm.graph.nodes if n.op == "placeholder"]
            ShapeProp(gm).propagate(*examples)
            return PassResult(gm, False)

    def rebuild(gm):
        return PassResult(torch.fx.GraphModule(gm, copy.deepcopy(gm.graph)), True)

    pm = PassManager([InteractionMapPass(inputs, features), relu_to_clamp, ShapePropPass(), rebuild,
                      Widen("fc1", 16), InteractionMapPass(), ShapePropPass()])
    out = pm(exported(model, inputs)).graph_module
    assert len(seen) == 1
    clamp, = [n for n in out.graph.nodes if n.target == aten.clamp_min.default]   # it survived the rewrite
    assert clamp.meta[LABELS] == FEATS and clamp.meta[KEY_LABELS] == units("fc1", 16)
    assert clamp.meta["tensor_meta"].shape == (2, 16)                 # ShapeProp ran on the new graph
    assert not any(n.target == aten.relu.default for n in out.graph.nodes)
    preserved(pm.passes[4].plan)
    assert unchanged(model, before)


def test_a_plain_graph_module_needs_inputs_and_a_rewrite_pass_takes_them():
    model, inputs, features = setup()
    gm = exported(model, inputs)
    with pytest.raises(PassError, match=r"carries no example inputs.*inputs="):
        Widen("fc1", by=2)(gm)
    res = Widen("fc1", by=2, inputs=inputs, features=features)(gm)
    assert res.modified and res.graph_module.state_dict()["fc1.weight"].shape == (10, 4)
    # The result carries them: the next pass needs nothing.
    res2 = RemoveFeatures("obs", ["mana"])(res.graph_module)
    assert res2.graph_module.state_dict()["fc1.weight"].shape == (10, 3)
    assert res2.graph_module.meta["fxsurgery"]["features"]["obs"] == fs.Features(["hp", "x", "y"])


def test_what_a_graph_module_carries_comes_before_what_the_constructor_was_given():
    model, inputs, features = setup()
    gm = AddFeatures("obs", ["armor"], inputs=inputs, features=features)(exported(model, inputs)).graph_module
    # The constructor describes the model before the change (4 features); the graph has 5.
    res = Widen("fc1", by=1, inputs=inputs, features=features)(gm)
    assert res.graph_module.state_dict()["fc1.weight"].shape == (9, 5)


def test_a_rewrite_result_is_not_traced_again_unless_its_graph_changed():
    model, inputs, features = setup()
    gm = Widen("fc1", by=2, inputs=inputs, features=features)(exported(model, inputs)).graph_module
    assert traced_source(gm) is gm.meta["fxsurgery"]["traced"]
    relu = next(n for n in gm.graph.nodes if n.target == aten.relu.default)
    relu.target = aten.tanh.default
    gm.recompile()
    fresh = traced_source(gm)
    assert fresh is not gm.meta["fxsurgery"]["traced"]
    assert any(n.target == aten.tanh.default for n in fresh.graph.nodes)


def test_every_resizing_pass_in_one_pipeline():
    model, inputs, features = setup(2)
    before = snapshot(model)
    passes = [InteractionMapPass(inputs, features), AddFeatures("obs", ["armor"], at=0),
              ReorderFeatures("obs", ["y", "x", "armor", "hp", "mana"]), RemoveFeatures("obs", ["x"]),
              Widen("fc1", size=10), PruneUnits("fc1", [9, 0, 1, 2, 3, 4, 5, 6, 7]),
              InsertIdentityLayer("fc1"), InteractionMapPass()]
    out = PassManager(passes)(exported(model, inputs)).graph_module
    sd = out.state_dict()
    assert sd["fc1.weight"].shape == (9, 4) and sd["fc1_identity.weight"].shape == (9, 9)
    assert node(out, "fc1_weight").meta[LABELS] == ("obs:y", "obs:armor", "obs:hp", "obs:mana")
    # Removing x and pruning are not function-preserving in general; the others are, exactly.
    for p in passes[1:3] + passes[4:5] + passes[6:7]:
        preserved(p.plan)
    # fc1's old unit 0 is now unit 1 (the new unit 9 went first).
    assert torch.equal(sd["fc1.bias"][1:], passes[4].result.state_dict()["fc1.bias"][:8])
    assert unchanged(model, before)


def test_categories_and_a_recurrent_core_of_the_five_like_policy():
    from fxsurgery.zoo import five_small
    torch.manual_seed(3)
    model, inputs, features = five_small()
    model.eval()
    before = snapshot(model)
    first, cats, core = InteractionMapPass(inputs, features), AddCategories("enemy_type", ["boss"]), Widen("core", by=4)
    out = PassManager([first, cats, core, InteractionMapPass()])(exported(model, inputs)).graph_module
    gm = first.traced.model
    emb = next(n for n in gm.graph.nodes if n.op == "get_attr" and n.target == "embeddings.enemy_type.weight")
    assert emb.meta[LABELS] == ("enemy_type:hero", "enemy_type:creep", "enemy_type:tower", "enemy_type:ward")
    lstm = next(n for n in out.graph.nodes if n.target == aten.lstm.input)
    assert tuple(l for l in lstm.meta[KEY_LABELS] if l.startswith("core")) == units("core.l0", 36)
    getitems = [n for n in out.graph.nodes if n.op == "call_function" and n.args and n.args[0] is lstm]
    assert getitems and all(n.meta[LABELS] == lstm.meta[LABELS] for n in getitems)
    emb_new = next(n for n in out.graph.nodes if n.op == "get_attr" and n.target == "embeddings.enemy_type.weight")
    assert emb_new.meta[LABELS][-1] == "enemy_type:boss" and len(emb_new.meta[LABELS]) == 5
    assert out.state_dict()["core.weight_hh_l0"].shape == (4 * 36, 36)
    preserved(cats.plan)
    preserved(core.plan)
    assert unchanged(model, before)


def test_bad_requests_fail_naming_what_exists_and_pass_arguments_are_checked_at_once():
    model, inputs, features = setup()
    gm = exported(model, inputs)
    with pytest.raises(PassError, match=r"no hidden axis 'fc9'.*'fc1', 'fc2'"):
        Widen("fc9", by=1, inputs=inputs, features=features)(gm)
    with pytest.raises(Exception, match="'AddFeatures' pass") as info:
        PassManager([InteractionMapPass(inputs, features), AddFeatures("obs", ["hp"])])(gm)
    assert isinstance(info.value.__cause__, PassError) and "already exist" in str(info.value.__cause__)
    with pytest.raises(TypeError, match=r"Widen\(group.*size.*by"):
        Widen("fc1", width=3)
    with pytest.raises(TypeError, match="AddFeatures"):
        AddFeatures()
    assert repr(Widen("fc1", by=2)) == "Widen('fc1', by=2)"
    with pytest.raises(PassError, match="expected a torch.fx.GraphModule"):
        InteractionMapPass(inputs, features)(model)
    assert unchanged(model, snapshot(model))


def test_matching_refuses_a_name_that_the_exporter_attributes_to_another_node():
    """A symbolically traced graph whose own node `relu` is not the exported `relu` (that one
    comes from inside a call_module): no labels rather than the wrong ones."""
    class Inner(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(4, 4)

        def forward(self, x):
            return torch.relu(self.l(x))

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.out = Inner(), nn.Linear(4, 2)

        def forward(self, obs):
            return self.out(torch.sigmoid(self.inner(obs)))

    class Leafy(torch.fx.Tracer):
        def is_leaf_module(self, m, name):
            return isinstance(m, Inner) or super().is_leaf_module(m, name)

    model = Outer()
    graph = Leafy().trace(model)
    gm = torch.fx.GraphModule(model, graph)
    # Rename the sigmoid "relu": a name the export gives to Inner's relu.
    sig = next(n for n in gm.graph.nodes if n.target is torch.sigmoid)
    sig.name = "relu"
    gm.recompile()
    inputs, features = {"obs": torch.randn(2, 4)}, {"obs": fs.Features(OBS)}
    traced = traced_source(gm, inputs, features)
    values, params, unmatched = match_nodes(gm, traced)
    exported_of = {v.name: k for k, v in values.items()}
    assert exported_of["inner"] == "relu"          # Inner's value: its relu, by provenance
    assert exported_of.get("relu") in (None, "sigmoid")   # never Inner's relu


def test_add_heads_as_a_pass():
    torch.manual_seed(4)
    model = Attention().eval()
    inputs, features = {"x": torch.randn(2, 3, 8)}, {"x": fs.Features([f"f{i}" for i in range(8)])}
    heads = fs.passes.AddHeads("", 2)
    out = PassManager([heads])(_with_inputs(model, inputs, features)).graph_module
    assert out.state_dict()["q.weight"].shape == (16, 8) and out.state_dict()["o.weight"].shape == (8, 16)
    preserved(heads.plan)


def _with_inputs(model, inputs, features):
    """A plain GraphModule whose placeholders carry the example inputs (as the analysis leaves them)."""
    gm = exported(model, inputs)
    InteractionMapPass(inputs, features)(gm)
    return gm


# the record of a chain of passes ------------------------------------------------------------------

def test_a_chain_keeps_every_plan_in_order_and_plans_the_first_model_against_the_last():
    model, inputs, features = setup(4)
    first = fs.trace(model, inputs, features)
    gm1 = fs.passes.add_features(first, "obs", ["armor"], at="mana")
    gm2 = fs.passes.prune_units(gm1, "fc1", list(range(8))[::-1])   # every unit kept, in reverse
    gm3 = fs.passes.widen(gm2, "fc1", by=2)
    rec = gm3.meta["fxsurgery"]
    assert isinstance(rec, fs.passes.PassRecord)
    assert rec.changes == ["add_features('obs')", "prune_units('fc1')", "widen('fc1')"]
    assert rec.plans == [gm1.meta["fxsurgery"].plan, gm2.meta["fxsurgery"].plan, rec.plan]
    assert rec.plans[0].old is first and rec.first is first and rec.plans[-1].new is rec.traced
    for p in rec.plans:
        preserved(p)
    whole = rec.composite()
    assert whole.old is first and whole.new is rec.traced
    assert whole.units == {"fc1": list(range(8))[::-1]}      # the reversal, through the widening
    assert [str(l) for l in whole.new_labels if l.kind == "feature"] == ["obs:armor"]
    preserved(whole)
    # The composite matches each element as the chain moved it: applied to a re-initialised copy of
    # the last module, it puts back the chain's weights (unit k of fc1 is the first model's unit
    # 7 - k). Planned by position, the copy would compute the same function (hidden units may be
    # permuted) with other weights: the units are what the composite adds.
    sd = gm3.state_dict()
    for units, same in ((whole.units, True), (None, False)):
        fresh = copy.deepcopy(gm3)
        with torch.no_grad():
            for t in fresh.parameters():
                t.normal_()
        p = fs.plan(first, fs.trace(fresh, rec.inputs, rec.features), units=units)
        p.apply()
        assert fs.verify(p).max <= TOL
        got = fresh.state_dict()
        assert torch.equal(got["fc1.bias"][:8], sd["fc1.bias"][:8]) == same
        assert torch.equal(got["fc2.weight"], sd["fc2.weight"]) == same


def test_a_composite_the_planner_cannot_express_is_refused_naming_the_axis():
    model, inputs, features = setup()
    gm = fs.passes.widen(fs.trace(model, inputs, features), "fc1", size=10)
    gm = fs.passes.prune_units(gm, "fc1", [9, 0, 1, 2, 3, 4, 5, 6, 7])   # a new unit before the old ones
    with pytest.raises(PassError, match=r"hidden axis 'fc1' holds new units before surviving ones"):
        gm.meta["fxsurgery"].composite()
    preserved(gm.meta["fxsurgery"].plans[0])                 # each pass's plan still says what it did


def test_a_single_pass_composite_is_its_plan_and_a_changed_module_starts_a_new_chain():
    model, inputs, features = setup()
    gm = fs.passes.widen(fs.trace(model, inputs, features), "fc1", by=2)
    assert gm.meta["fxsurgery"].composite() is gm.meta["fxsurgery"].plan
    relu = next(n for n in gm.graph.nodes if n.target == aten.relu.default)
    relu.target = aten.tanh.default          # edited by hand: not what the record's plans describe
    gm.recompile()
    rec = fs.passes.widen(gm, "fc1", by=1).meta["fxsurgery"]
    assert len(rec.plans) == 1 and rec.first.model is gm


def test_the_record_reads_like_the_dict_it_replaces():
    model, inputs, features = setup()
    rec = fs.passes.widen(fs.trace(model, inputs, features), "fc1", by=2).meta["fxsurgery"]
    assert rec["plan"] is rec.plan and rec["inputs"] is rec.inputs and "traced" in rec and "nope" not in rec
    assert rec.get("batch").startswith("free") and rec.get("nope", 3) == 3
    with pytest.raises(KeyError, match=r"no field 'nope'; its fields are \[.*'plan'"):
        rec["nope"]


def test_pass_classes_hold_their_functions():
    from fxsurgery.passes.infra import REWRITE_PASSES, rewrite_pass
    assert Widen.function is fs.passes.widen and REWRITE_PASSES["prune_units"] is PruneUnits
    with pytest.raises(TypeError, match="expects the pass function itself"):
        rewrite_pass("widen")

    def widen_twice(model, group):
        return fs.passes.widen(fs.passes.widen(model, group, by=1), group, by=1)

    WidenTwice = rewrite_pass(widen_twice)
    model, inputs, features = setup()
    out = WidenTwice("fc1", inputs=inputs, features=features)(exported(model, inputs)).graph_module
    assert out.state_dict()["fc1.weight"].shape == (10, 4)
    assert len(out.meta["fxsurgery"].plans) == 2


def test_a_composite_through_an_inserted_layer_whose_axis_was_pruned_is_refused():
    model, inputs, features = setup()
    gm = fs.passes.insert_identity_layer(fs.trace(model, inputs, features), "fc1")
    gm = fs.passes.prune_units(gm, "fc1", [0, 2, 4])
    with pytest.raises(PassError, match=r"'fc1_identity' is an inserted layer standing for 'fc1', whose units a later"):
        gm.meta["fxsurgery"].composite()

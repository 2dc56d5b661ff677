"""Training state through a plan: element masks, and an optimizer's state carried so that
training goes on as if nothing had happened."""
from __future__ import annotations

import pytest
import torch

import fxsurgery as fs
from fxsurgery.surgery.training_state import carry_optimizer_state_dict


def mlp(n_in, hidden, seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(n_in, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 3))


OLD_F = fs.Features(["hp", "mana", "x", "y"])
NEW_F = fs.Features(["hp", "armor", "mana", "x", "y"])


def _batch(seed, features):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 4, generator=g)
    y = torch.randn(16, 3, generator=g)
    wide = torch.zeros(16, len(features))
    for i, n in enumerate(OLD_F.names):
        wide[:, features.names.index(n)] = x[:, i]
    return x, wide, y


def _step(model, opt, x, y):
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step()


def _trained_pair(make_opt):
    old = mlp(4, 8, 0)
    opt = make_opt(old.parameters())
    for s in range(3):
        x, _, y = _batch(s, OLD_F)
        _step(old, opt, x, y)
    new = mlp(5, 12, 1)
    new, plan = fs.transplant(old, new, {"x": torch.randn(2, 4)}, {"x": torch.randn(2, 5)},
                              {"x": OLD_F}, {"x": NEW_F})
    return old, opt, new, plan


@pytest.mark.parametrize("make_opt", [
    lambda p: torch.optim.Adam(p, lr=1e-2),
    lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9),
], ids=["adam", "adamw", "sgd-momentum"])
def test_the_next_step_is_the_old_models_next_step(make_opt):
    old, old_opt, new, plan = _trained_pair(make_opt)
    assert plan.preserves_function
    new_opt = plan.carry_optimizer(old_opt, make_opt(new.parameters()))
    masks = plan.masks()
    x, wide, y = _batch(10, NEW_F)
    _step(old, old_opt, x, y)
    _step(new, new_opt, wide, y)
    # On every copied element the new model took the step the old one took.
    sd_old, sd_new = old.state_dict(), new.state_dict()
    checked = 0
    for name, m in masks.items():
        p = plan.params[name]
        expected = torch.zeros_like(sd_new[name])
        from fxsurgery.surgery.apply import build
        expected = build(p.match, sd_old[p.old_name], expected)
        assert torch.allclose(sd_new[name][m.copied], expected[m.copied], atol=1e-6), name
        checked += int(m.copied.sum())
    assert checked == sum(v.numel() for v in sd_old.values())


def test_without_the_carried_state_the_step_differs():
    """The planted bug: a fresh optimizer (no state carried) is caught by the comparison above."""
    old, old_opt, new, plan = _trained_pair(lambda p: torch.optim.Adam(p, lr=1e-2))
    new_opt = torch.optim.Adam(new.parameters(), lr=1e-2)
    x, wide, y = _batch(10, NEW_F)
    _step(old, old_opt, x, y)
    _step(new, new_opt, wide, y)
    w_old, w_new = old.state_dict()["0.weight"], new.state_dict()["0.weight"]
    # new column 1 is "armor"; old columns 0, 2, 3, 4 <- 0, 1, 2, 3; rows 0..7 are the old units
    assert not torch.allclose(w_new[:8][:, [0, 2, 3, 4]], w_old, atol=1e-6)


def test_masks_and_state_of_new_elements():
    old, old_opt, new, plan = _trained_pair(lambda p: torch.optim.Adam(p, lr=1e-2))
    masks = plan.masks()
    m = masks["0.weight"]
    assert m.copied.shape == (12, 5)
    assert int(m.copied.sum()) == 8 * 4 and bool(m.new[:, 1].all()) and bool(m.new[8:].all())
    assert bool(m.zeroed[:, 1].all())                     # the new feature's column is zeroed
    assert not m.zeroed[8:, [0, 2, 3, 4]].any()          # new units' incoming weights keep their init
    assert bool(masks["2.weight"].zeroed[:, 8:].all())   # ... their outgoing weights are zeroed
    new_opt = plan.carry_optimizer(old_opt, torch.optim.Adam(new.parameters(), lr=1e-2))
    st = new_opt.state[new[0].weight]
    assert not st["exp_avg"][m.new].any() and not st["exp_avg_sq"][m.new].any()
    assert torch.equal(st["step"], old_opt.state[old[0].weight]["step"])


def test_state_dict_form_and_bad_input():
    old, old_opt, new, plan = _trained_pair(lambda p: torch.optim.Adam(p, lr=1e-2))
    names = [n for n, _ in new.named_parameters()]
    sd = carry_optimizer_state_dict(plan, old_opt.state_dict(), names)
    assert sorted(sd["state"]) == [0, 1, 2, 3] and sd["param_groups"][0]["params"] == [0, 1, 2, 3]
    fresh = torch.optim.Adam(new.parameters(), lr=1e-2)
    fresh.load_state_dict(sd)
    with pytest.raises(fs.SurgeryError, match="holds 4 parameters but the old model has 3"):
        carry_optimizer_state_dict(plan, old_opt.state_dict(), names, ["0.weight", "0.bias", "2.weight"])
    with pytest.raises(fs.SurgeryError, match="has 'state' and 'param_groups'"):
        carry_optimizer_state_dict(plan, {"weights": 1}, names)
    with pytest.raises(fs.SurgeryError, match="not one of Sequential's"):
        plan.carry_optimizer(old_opt, torch.optim.Adam([torch.nn.Parameter(torch.ones(2))]))


def test_new_elements_may_take_the_mean_second_moment():
    old, old_opt, new, plan = _trained_pair(lambda p: torch.optim.Adam(p, lr=1e-2))
    new_opt = plan.carry_optimizer(old_opt, torch.optim.Adam(new.parameters(), lr=1e-2), new_scale="mean")
    m = plan.masks()["0.weight"]
    st, old_st = new_opt.state[new[0].weight], old_opt.state[old[0].weight]
    assert torch.allclose(st["exp_avg_sq"][m.new], old_st["exp_avg_sq"].mean().expand(int(m.new.sum())))
    assert torch.equal(st["exp_avg_sq"][:8][:, [0, 2, 3, 4]], old_st["exp_avg_sq"])   # copied: unchanged
    assert not st["exp_avg"][m.new].any()                                         # first moments: zero

"""What a model returns, as logits (genprobe.logits): a tensor, a tuple's first element, a
mapping's or an object's ``logits``, or ``Subject(..., output=f)``; the errors when none applies.
Every shared engine and probe test also runs on two foreign models that return an object and a
dict (tests/foreign.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import genprobe as gp
from foreign import ReturnsScores, make_subject
from genprobe.errors import ConfigError, DataError, StateError
from genprobe.logits import logits_of


class Returning(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        z = self.fc(x)
        return {"tuple": lambda: (z, x), "list": lambda: [z], "dict": lambda: {"hidden": x, "logits": z},
                "none": lambda: {"hidden": x}, "string": lambda: "logits"}[self.how]()


def _subject(how, **kw):
    torch.manual_seed(0)
    model = Returning(how)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.fc.weight.add_(0.5)
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    return model, gp.Subject(model, init=init, train=(x, y), test=(x, y), num_classes=3, **kw)


@pytest.mark.parametrize("how", ["tuple", "list", "dict"])
def test_default_rule_reads_the_logits(how):
    model, s = _subject(how)
    x, y = s.test
    with torch.no_grad():
        expected = model.fc(x)
    torch.testing.assert_close(s.model(x), expected)  # the Subject's copy returns the logits
    assert gp.evaluate(s.model, s.final, s.test).loss == pytest.approx(
        float(nn.functional.cross_entropy(expected, y)), rel=1e-6)
    assert type(model) is Returning and isinstance(model(x), (tuple, list, dict))  # caller's own
    r = gp.robustness(s, checkpoints=[0], draws=1)
    assert r.table.error.notna().all()


def test_output_function_and_the_callers_model_untouched():
    s = make_subject("returns_scores")
    model = ReturnsScores()
    assert type(model).forward is ReturnsScores.forward and isinstance(model(torch.randn(2, 5)), dict)
    assert type(s.model).__name__ == "ReturnsScores" and isinstance(s.model, ReturnsScores)
    out = s.model(s.test.x)
    assert isinstance(out, torch.Tensor) and out.shape == (len(s.test), 3)


def test_no_logits_without_output_is_one_clear_error():
    with pytest.raises(DataError, match=r"returned a dict with keys 'hidden', with no logits .*"
                                         r"output=lambda out"):
        _subject("none")
    with pytest.raises(DataError, match=r"output= returned a str, not the logits tensor"):
        _subject("none", output=lambda out: "x")
    with pytest.raises(ConfigError, match="output= must be a function"):
        _subject("dict", output="logits")
    _, s = _subject("none", output=lambda out: out["hidden"][:, :3])
    assert s.model(s.test.x).shape == (10, 3)


def test_logits_of_rules():
    z = torch.randn(2, 3)

    class WithLogits:
        logits = z

    assert logits_of(z) is z and logits_of((z, 1)) is z and logits_of({"logits": z, "a": 1}) is z
    assert logits_of(WithLogits()) is z and logits_of({"s": z}, lambda o: o["s"]) is z
    with pytest.raises(StateError, match=r"a tuple of 2 \(int, Tensor\)"):
        logits_of((1, z))

"""Models of the libraries users bring, built from tiny configs (nothing downloaded): a Hugging
Face BERT encoder and a GPT-2 decoder for sequence classification. Every registered probe runs on
both through the shared probe tester (tests/test_probe_contract.py, LIBRARIES); here, a cell of
each against the plain loop, with a whole transformer layer as one unit."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import genprobe as gp
from foreign import LIBRARIES, make_subject

pytestmark = [pytest.mark.skipif(not LIBRARIES, reason="transformers is not installed"),
              pytest.mark.usefixtures("one_thread")]


@pytest.mark.parametrize("name, layer", [("hf_bert", "bert.encoder.layer.1"),
                                         ("hf_gpt2", "transformer.h.1")])
def test_a_transformer_layer_rewound_as_one_unit_equals_the_plain_loop(name, layer):
    s = make_subject(name, n_train=24, n_test=18)
    r = gp.robustness(s, modules={"layer": f"{layer}.*"}, checkpoints=[0], draws=1)
    row = r.table[(r.table.module == "layer") & (r.table.kind == "reinit")].iloc[0]
    model = copy.deepcopy(s.model)  # the plain loop: rewind every key of the layer, forward
    keys = [k for k in s.final if k.startswith(layer + ".")]
    (unit,) = s.units({"layer": f"{layer}.*"})
    assert len(keys) > 8 and set(unit.params) == set(keys)  # every weight of the layer, one unit
    model.load_state_dict({**s.final, **{k: s.init[k] for k in keys}}, strict=False)
    with torch.no_grad():
        logits = model(s.test.x)
    assert row.loss == pytest.approx(float(F.cross_entropy(logits.double(), s.test.y)), rel=1e-5)
    assert row.error == pytest.approx(float((logits.argmax(-1) != s.test.y).double().mean()))


def test_a_bert_from_its_config_becomes_a_subject_from_its_state_dict():
    """The issue's first try: BertForSequenceClassification's state_dict() leaves out its
    position-ids buffer, which genprobe required ("final is missing key
    'bert.embeddings.position_ids'"); it returns a SequenceClassifierOutput."""
    factory, (_, t, vocab), k = LIBRARIES["hf_bert"]
    torch.manual_seed(0)
    model = factory().eval()
    x, y = torch.randint(0, vocab, (12, t)), torch.randint(0, k, (12,))
    s = gp.Subject(model, final=model.state_dict(), train=(x, y), num_classes=k)
    assert all("position_ids" not in key for key in s.final)
    with torch.no_grad():
        expected = model(x).logits
    torch.testing.assert_close(s.model(x), expected)


def test_units_lists_what_modules_selects_and_the_activation_sites():
    s = make_subject("hf_bert", n_train=12, n_test=6)
    table = gp.units(s)
    units = table[~table.site]
    assert list(units.unit) == [u.name for u in s.units()]
    assert units.parameters.sum() == sum(p.numel() for p in s.model.parameters())
    sites = list(table[table.site].unit)  # the MLPs' GELUs (transformers' GELUActivation), the pooler
    assert sites == ["bert.encoder.layer.0.intermediate.intermediate_act_fn",
                     "bert.encoder.layer.1.intermediate.intermediate_act_fn", "bert.pooler.activation"]
    layers = gp.units(s.model, {f"layer{i}": f"bert.encoder.layer.{i}" for i in range(2)})
    assert list(layers[~layers.site].unit) == ["layer0", "layer1"]
    assert list(layers[~layers.site].types) == ["BertLayer", "BertLayer"]

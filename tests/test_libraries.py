"""Models of the libraries users bring, built from tiny configs (nothing downloaded): a Hugging
Face BERT encoder and a GPT-2 decoder for sequence classification, torchvision's ResNet-18, a timm
ViT and ConvNeXt. Every registered probe runs on each through the shared probe tester
(tests/test_probe_contract.py, LIBRARIES and VISION); here, a cell of each against the plain
loop, with a whole transformer layer or residual stage as one unit."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import genprobe as gp
from foreign import LIBRARIES, VISION, make_subject
from genprobe.engine.sites import hooked
from genprobe.inputs import call

pytestmark = pytest.mark.usefixtures("one_thread")
needs_transformers = pytest.mark.skipif(not LIBRARIES, reason="transformers is not installed")
needs_vision = pytest.mark.skipif(len(VISION) < 3, reason="torchvision or timm is not installed")


def _rewound_unit_equals_the_plain_loop(s: gp.Subject, layer: str) -> None:
    """Robustness's re-initialization of every key under `layer` as one unit, against a copy of
    the model with those keys loaded from θ⁰ and run forward."""
    r = gp.robustness(s, modules={"layer": f"{layer}.*"}, checkpoints=[0], draws=1)
    row = r.table[(r.table.module == "layer") & (r.table.kind == "reinit")].iloc[0]
    model = copy.deepcopy(s.model)
    keys = [k for k, _ in s.model.named_parameters() if k.startswith(layer + ".")]
    (unit,) = s.units({"layer": f"{layer}.*"})
    assert len(keys) > 8 and set(unit.params) == set(keys)  # every weight of the layer, one unit
    # (BatchNorm's running statistics stay at θ^F: the default buffers="keep")
    model.load_state_dict({**s.final, **{k: s.init[k] for k in keys}}, strict=False)
    with torch.no_grad():
        logits = call(model, s.test.x)  # the Subject's model returns logits
    assert row.loss == pytest.approx(float(F.cross_entropy(logits.double(), s.test.y)), rel=1e-5)
    assert row.error == pytest.approx(float((logits.argmax(-1) != s.test.y).double().mean()))


@needs_transformers
@pytest.mark.parametrize("name, layer", [("hf_bert", "bert.encoder.layer.1"),
                                         ("hf_gpt2", "transformer.h.1")])
def test_a_transformer_layer_rewound_as_one_unit_equals_the_plain_loop(name, layer):
    _rewound_unit_equals_the_plain_loop(make_subject(name, n_train=24, n_test=18), layer)


@needs_vision
@pytest.mark.parametrize("name, layer", [("tv_resnet18", "layer3"), ("timm_vit", "blocks.1"),
                                         ("timm_convnext", "stages.2")])
def test_a_vision_stage_rewound_as_one_unit_equals_the_plain_loop(name, layer):
    _rewound_unit_equals_the_plain_loop(make_subject(name, n_train=40, n_test=12, steps=1), layer)


@needs_vision
def test_a_channels_last_mlp_has_its_units_on_the_last_dim():
    """ConvNeXt's MLP is a Linear on (n, H, W, C) features: its 64 hidden units lie on the last
    dim, not dim 1 (4 rows of the feature map), where a shape rule for 4-D maps would put them."""
    s = make_subject("timm_convnext", n_train=24, n_test=18)
    site = "gelu(stages.1.blocks.0.mlp.fc1)"
    assert site in set(gp.units(s).unit)
    r = gp.selectivity(s, layers=site, split="test", negative="shift", importance=False)
    seen = []
    with torch.no_grad(), hooked(s.model, {site: lambda out: seen.append(out.clone())}):
        s.model(s.test.x)
    (h,) = seen
    assert h.shape[1:] == (4, 4, 64)
    plain = h.double().mean(dim=(1, 2)).mean(dim=0)  # each unit: mean over positions, then examples
    assert len(r.table) == 64
    torch.testing.assert_close(torch.tensor(r.table.mean_activation.to_numpy()), plain, rtol=1e-6, atol=1e-9)


@needs_vision
def test_resnet18_in_place_relus_are_sites_and_ablate_like_a_hook():
    """torchvision's blocks call one in-place ReLU module twice; ablating every unit of
    ``layer4.1.relu`` (both calls) equals a hook that zeroes its output."""
    s = make_subject("tv_resnet18", n_train=40, n_test=12, steps=1)
    table = gp.units(s)
    assert "layer4.1.relu" in set(table[table.site].unit)
    r = gp.ablation(s, layers="layer4.1.relu", split="test", order="random", orders=1, steps=2)
    curve = r.table[r.table.layer == "layer4.1.relu"]
    full = curve[curve.fraction == curve.fraction.max()].iloc[0]
    with torch.no_grad(), hooked(s.model, {"layer4.1.relu": lambda out: torch.zeros_like(out)}):
        logits = s.model(s.test.x)
    assert full.fraction == 1.0
    assert full.accuracy == pytest.approx(float((logits.argmax(-1) == s.test.y).double().mean()))


@needs_transformers
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


@needs_transformers
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

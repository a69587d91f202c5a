"""Structured inputs — a tuple of tensors (positional arguments) or a mapping of names to tensors
(keyword arguments, a tokenizer's output) — through the Subject, the engines and the probes:
against plain loops that unpack the inputs by hand, and against the plain tensor path on the
same network."""

from __future__ import annotations

import collections
import copy

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import genprobe as gp
from foreign import LIBRARIES, STRUCTURED, MaskedTokens, make_subject, padded_tokens
from genprobe import inputs
from genprobe.engine.grams import IMPLEMENTATIONS, gram
from genprobe.errors import DataError
from genprobe.probes.registry import get_probe

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = sorted(STRUCTURED) + sorted({"hf_bert_masked"} & set(LIBRARIES))


def pick(x, index):
    if isinstance(x, dict):
        return {k: v[index] for k, v in x.items()}
    return tuple(v[index] for v in x) if isinstance(x, tuple) else x[index]


def forward(model, state, x):
    """By hand: model(**x) for a mapping, model(*x) for a tuple."""
    if isinstance(x, dict):
        return functional_call(model, state, (), x)
    return functional_call(model, state, x if isinstance(x, tuple) else (x,))


# ----------------------------------------------------------------------------- the structure


def test_a_tokenizer_output_is_read_as_a_mapping_and_lists_as_tuples():
    encoding = collections.UserDict({"input_ids": [[1, 2, 0]], "attention_mask": [[1, 1, 0]]})
    x = inputs.normalize(encoding)  # BatchEncoding is a UserDict: a Mapping, not a dict
    assert isinstance(x, dict) and list(x) == ["input_ids", "attention_mask"]
    assert x["input_ids"].dtype == torch.int64 and x["input_ids"].shape == (1, 3)
    assert isinstance(inputs.normalize([torch.zeros(2, 3), torch.ones(2)]), tuple)
    nested = inputs.normalize([[1.0, 2.0], [3.0, 4.0]])  # numbers: one tensor, not a tuple
    assert isinstance(nested, torch.Tensor) and nested.shape == (2, 2)


def test_take_move_cat_and_call_keep_the_structure():
    ids, mask = padded_tokens(5, 4, 9, torch.Generator().manual_seed(0))
    x = {"ids": ids, "mask": mask.bool(), "scale": torch.rand(5, dtype=torch.float64)}
    part = inputs.take(x, [4, 0])
    assert torch.equal(part["ids"], ids[[4, 0]]) and torch.equal(part["mask"], mask.bool()[[4, 0]])
    moved = inputs.move(x, "cpu", torch.float32)
    assert moved["scale"].dtype == torch.float32  # floating leaves take the model's dtype
    assert moved["ids"].dtype == torch.int64 and moved["mask"].dtype == torch.bool  # never cast
    joined = inputs.cat([inputs.take(x, slice(0, 2)), inputs.take(x, slice(2, 5))])
    assert all(torch.equal(a, b) for a, b in zip(inputs.leaves(joined), inputs.leaves(x), strict=True))
    assert inputs.count(x) == 5
    assert inputs.call(lambda ids, mask, scale: ids.shape, x) == (5, 4)
    assert inputs.call(lambda a, b: a.shape, (ids, mask)) == (5, 4)


@pytest.mark.parametrize("items, message", [
    ([({"ids": torch.ones(3)}, 0), ({"ids": torch.ones(3), "mask": torch.ones(3)}, 1)],
     r"item 1's input is a mapping \{ids: \(3,\) float32, mask: \(3,\) float32\}, item 0's a mapping "
     r"\{ids: \(3,\) float32\}; every input must have the same structure"),
    ([((torch.ones(3), torch.ones(3)), 0), ({"a": torch.ones(3), "b": torch.ones(3)}, 1)],
     r"item 1's input is a mapping .*, item 0's a tuple"),
    ([((torch.ones(3), torch.ones(3)), 0), ((torch.ones(3), torch.ones(4)), 1)],
     r"item 1's input is a tuple \(\(3,\) float32, \(4,\) float32\)"),
])
def test_an_input_structure_that_differs_between_examples_is_named(items, message):
    with pytest.raises(DataError, match="train: " + message):
        gp.Subject(MaskedTokens(), train=items)


def test_parts_of_different_lengths_and_bad_values_are_refused():
    ids, mask = padded_tokens(6, 4, 9, torch.Generator().manual_seed(0))
    y = torch.zeros(6, dtype=torch.long)
    with pytest.raises(DataError, match=r"train: input \[1\] has 5 examples, the first part 6"):
        gp.Subject(MaskedTokens(vocab=9), train=((ids, mask[:5]), y))
    with pytest.raises(DataError, match=r"train: 6 inputs but 5 labels"):
        gp.Subject(MaskedTokens(vocab=9), train=((ids, mask), y[:5]))
    with pytest.raises(DataError, match=r"train: 1 input\(s\) mask hold NaN"):
        bad = mask.double()
        bad[2, 0] = float("nan")
        gp.Subject(MaskedTokens(vocab=9), train=({"ids": ids, "mask": bad}, y))


def test_a_mapping_missing_a_key_the_model_needs_quotes_the_models_error():
    ids, _ = padded_tokens(6, 4, 9, torch.Generator().manual_seed(0))
    model = STRUCTURED["masked_dict"][0](vocab=9)
    with pytest.raises(DataError) as info:
        gp.Subject(model, train=({"ids": ids}, torch.zeros(6, dtype=torch.long)))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("train: inputs {ids: (4,) int64} do not fit the model: ")
    assert "missing 1 required positional argument: 'mask'" in message


def test_a_dataset_of_mappings_equals_the_in_memory_path():
    g = torch.Generator().manual_seed(3)
    ids, mask = padded_tokens(20, 6, 20, g)
    y = torch.randint(0, 3, (20,), generator=g)

    class Encoded(torch.utils.data.Dataset):  # what a tokenized text dataset yields
        def __len__(self):
            return 20

        def __getitem__(self, i):
            return collections.UserDict({"ids": ids[i], "mask": mask[i]}), int(y[i])

    model = STRUCTURED["masked_dict"][0]()
    init = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    a = gp.Subject(model, init=init, train=Encoded(), test=Encoded())
    b = gp.Subject(model, init=init, train=({"ids": ids, "mask": mask}, y),
                   test=({"ids": ids, "mask": mask}, y))
    assert isinstance(a.train.x, dict) and torch.equal(a.train.x["mask"], b.train.x["mask"])
    ra, rb = gp.robustness(a, draws=1), gp.robustness(b, draws=1)
    pd.testing.assert_frame_equal(ra.table, rb.table)


# ----------------------------------------------------------------------------- engines


@pytest.fixture(scope="module")
def subjects():
    return {name: make_subject(name, dtype=torch.float64, n_train=10, n_test=6) for name in NAMES}


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("name", NAMES)
def test_loss_gram_with_masks_equals_the_loop(subjects, name, impl):
    s = subjects[name]
    x, y = s.train.x, s.train.y
    names = [k for k, _ in s.model.named_parameters()]
    rows = []
    for i in range(len(y)):
        params = {k: s.final[k].clone().requires_grad_(True) for k in names}
        out = forward(s.model, {**s.final, **params}, pick(x, slice(i, i + 1)))
        grads = torch.autograd.grad(F.cross_entropy(out, y[i:i + 1]), list(params.values()),
                                    allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                               for g, p in zip(grads, params.values(), strict=True)]))
    f = torch.stack(rows)
    expected = f @ f.T
    r = gram(s.model, s.final, x, y1=y, implementation=impl)
    scale = float(expected.abs().max())
    assert float((r.matrix - expected).abs().max()) <= 1e-10 * scale
    half = gram(s.model, s.final, pick(x, slice(0, 4)), pick(x, slice(4, 10)), y1=y[:4], y2=y[4:],
                implementation=impl)  # a rectangular Gram concatenates the two sets' inputs
    assert float((half.matrix - expected[:4, 4:]).abs().max()) <= 1e-10 * scale


@pytest.mark.parametrize("name", NAMES)
def test_a_layer_rewound_with_masks_equals_the_plain_loop(subjects, name):
    s = subjects[name]
    first = {"masked_tuple": "fc", "masked_dict": "fc", "hf_bert_masked": "bert.encoder.layer.0.*"}[name]
    r = gp.robustness(s, modules={"unit": first}, checkpoints=[0], draws=1)
    row = r.table[(r.table.module == "unit") & (r.table.kind == "reinit")].iloc[0]
    (unit,) = s.units({"unit": first})
    state = {**s.final, **{k: s.init[k] for k in unit.params}}
    with torch.no_grad():
        logits = forward(s.model, state, s.test.x)
    assert row.loss == pytest.approx(float(F.cross_entropy(logits.double(), s.test.y)), rel=1e-9)
    assert row.error == pytest.approx(float((logits.argmax(-1) != s.test.y).double().mean()))


def test_the_traced_program_takes_tuples_and_mappings(subjects):
    """torch.fx traces MaskedTokens: the prefix-reuse route binds a tuple by position and a
    mapping by argument name (the engine checks the traced graph against the forward)."""
    from genprobe.engine.variants import VariantEvaluator

    for name in ("masked_tuple", "masked_dict"):
        s = subjects[name]
        ev = VariantEvaluator(s.model, s.final, s.test)
        assert ev.mode == "fx", ev.fallback_reason


# ----------------------------------------------------------------------------- the tensor path


class IdsOnly(MaskedTokens):
    """The same network on token ids alone (every token real): the plain tensor path."""

    def forward(self, ids):
        return super().forward(ids, torch.ones_like(ids))


@pytest.mark.parametrize("probe", ["robustness", "criticality", "ntk", "stiffness", "ablation",
                                   "selectivity", "activation_noise"])
def test_a_tuple_input_gives_what_the_tensor_path_gives(probe):
    """(ids, ones) through every probe equals ids alone on the same weights: the structured
    path changes nothing but how the inputs are passed."""
    g = torch.Generator().manual_seed(5)
    torch.manual_seed(5)
    plain, structured = IdsOnly(), MaskedTokens()
    structured.load_state_dict(plain.state_dict())
    init = copy.deepcopy(plain.state_dict())
    with torch.no_grad():
        for p in plain.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=g))
    final = plain.state_dict()
    ids, ids_test = torch.randint(0, 20, (24, 6), generator=g), torch.randint(0, 20, (18, 6), generator=g)
    y, y_test = torch.randint(0, 3, (24,), generator=g), torch.randint(0, 3, (18,), generator=g)
    a = gp.Subject(plain, init=init, final=final, train=(ids, y), test=(ids_test, y_test))
    b = gp.Subject(structured, init=init, final=final, train=((ids, torch.ones_like(ids)), y),
                   test=((ids_test, torch.ones_like(ids_test)), y_test))
    spec = get_probe(probe)
    # stiffness's input distance joins a tuple's parts: the all-ones mask leaves Euclidean
    # distances unchanged, not cosine ones
    options = spec.tiny | ({"distance": "euclidean"} if probe == "stiffness" else {})
    ra, rb = (spec.function(s, **options) for s in (a, b))
    pd.testing.assert_frame_equal(ra.table, rb.table, check_exact=False, rtol=1e-5, atol=1e-7)
    assert ra.summary.keys() == rb.summary.keys()
    for k in ra.summary:
        assert ra.summary[k] == pytest.approx(rb.summary[k], rel=1e-5, abs=1e-7, nan_ok=True), k

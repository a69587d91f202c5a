"""Subject construction and validation; results round-trip; evaluation against a hand loop."""

import math

import pandas as pd
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import genprobe as gp
from genprobe import DataError, StateError


def _model():
    return nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))


def test_validation_names_the_bad_key_and_shape():
    m = _model()
    state = m.state_dict()
    with pytest.raises(StateError, match=r"missing key '2.bias'"):
        gp.Subject(m, init={k: v for k, v in state.items() if k != "2.bias"})
    with pytest.raises(StateError, match=r"unexpected key 'extra.weight'"):
        gp.Subject(m, final=state | {"extra.weight": torch.zeros(1)})
    with pytest.raises(StateError, match=r"checkpoints\[3\]\['0.weight'\] has shape \(2, 2\)"):
        gp.Subject(m, checkpoints={3: state | {"0.weight": torch.zeros(2, 2)}})
    with pytest.raises(StateError, match="needs the initial state"):
        gp.Subject(m).require_init("robustness")
    with pytest.raises(StateError, match="recorded epochs"):
        gp.Subject(m, init={k: v + 1 for k, v in state.items()}).state(7)


def test_data_forms_are_converted_once():
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    a = gp.Subject(_model(), train=(x, y))
    b = gp.Subject(_model(), train=TensorDataset(x, y))
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.train.y, b.train.y)
    assert a.num_classes == 3
    with pytest.raises(DataError, match="labels must be a 1-D integer"):
        gp.Subject(_model(), train=(x, y.float()))
    with pytest.raises(DataError, match="6 inputs but 5 labels"):
        gp.Subject(_model(), train=(x, y[:5]))
    with pytest.raises(DataError, match="no test data"):
        a.data("test")


def test_subject_copies_the_model_and_init_is_checkpoint_zero():
    m = _model().train()
    init = {k: v.clone() + 0.5 for k, v in m.state_dict().items()}
    s = gp.Subject(m, init=init)
    assert m.training and not s.model.training  # the caller's model keeps its mode
    assert s.checkpoints[0] is s.init
    with torch.no_grad():
        m[0].weight.add_(1.0)
    assert not torch.equal(s.final["0.weight"], m[0].weight)  # later changes to the caller's model don't leak in


def test_evaluate_matches_a_hand_loop(foreign_subject):
    s = foreign_subject
    got = gp.evaluate(s.model, s.final, s.test, batch_size=5)
    model = s.model
    model.load_state_dict(s.final)
    with torch.no_grad():
        out = model(s.test.x)
    loss = nn.functional.cross_entropy(out, s.test.y).item()
    error = (out.argmax(1) != s.test.y).float().mean().item()
    assert got.loss == pytest.approx(loss, rel=1e-5) and got.error == pytest.approx(error)
    default = gp.evaluate(s.model, s.final, s.test)   # the CPU-sized default batch
    assert default.loss == pytest.approx(loss, rel=1e-5) and default.error == pytest.approx(error)


def test_cpu_batch_follows_the_largest_activation():
    import importlib

    E = importlib.import_module("genprobe.evaluate")   # the module (gp.evaluate is the function)

    conv = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 32 * 32, 10))
    x = torch.randn(3, 3, 32, 32)
    assert E.largest_activation_bytes(conv, x) == 16 * 32 * 32 * 4     # the conv output, per example
    assert E.cpu_chunk(16 * 32 * 32 * 4) == 128                          # 8 MiB of it
    assert E.cpu_chunk(1e9) == E.MIN_CPU_CHUNK and E.cpu_chunk(1.0) == E.DEFAULT_BATCH_SIZE
    assert E.cpu_chunk(4096, limit=100) == 100


def test_result_round_trip_is_exact(tmp_path):
    table = pd.DataFrame({"module": ["a", "b"], "value": [0.1, float("nan")], "flag": [True, False],
                          "n": [1, 2]})
    r = gp.Result(table=table, summary={"x": 1.5, "y": math.nan}, meta={"options": {"k": (1, 2)}, "seed": 3},
                  tables={"extra": table.head(1)}, tensors={"m": torch.arange(6.0).reshape(2, 3)})
    r.save(tmp_path / "r")
    back = gp.load(tmp_path / "r")
    pd.testing.assert_frame_equal(back.table, table)
    pd.testing.assert_frame_equal(back.tables["extra"], table.head(1))
    assert back.summary["x"] == 1.5 and math.isnan(back.summary["y"])
    assert torch.equal(back.tensors["m"], r.tensors["m"])
    assert back.meta["seed"] == 3 and back.meta["probe"] == "result"
    assert back.meta["genprobe_version"] == gp.__version__  # provenance, recorded by the base class
    r.save(tmp_path / "r")  # overwriting an existing result works and leaves no temp dirs
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]
    with pytest.raises(gp.RunError, match="not a readable genprobe result"):
        gp.load(tmp_path / "missing")


def test_broken_states_are_errors_naming_the_tensor():
    m = _model()
    state = {k: v.clone() for k, v in m.state_dict().items()}
    state["2.weight"][0, 1] = float("nan")
    with pytest.raises(StateError, match=r"final\['2.weight'\] holds 1 NaN"):
        gp.Subject(m, final=state)
    state["2.weight"][0, 1] = float("inf")
    with pytest.raises(StateError, match=r"checkpoints\[4\]\['2.weight'\]"):
        gp.Subject(m, checkpoints={4: state})
    with pytest.raises(StateError, match="init is identical to final"):
        gp.Subject(m, init=m.state_dict())  # the live state dict, not a copy made before training


def test_bad_data_is_an_error():
    m = _model()
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    with pytest.raises(DataError, match="train is empty"):
        gp.Subject(m, train=(x[:0], y[:0]))
    bad = x.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(DataError, match="position 3"):
        gp.Subject(m, test=(bad, y))
    with pytest.raises(DataError, match="label 2 is out of range for num_classes=2"):
        gp.Subject(m, train=(x, y), num_classes=2)
    with pytest.raises(DataError, match=">= 0"):
        gp.Subject(m, train=(x, y - 1))


def test_inputs_take_the_model_dtype_and_token_ids_stay_integer():
    m = _model().double()
    s = gp.Subject(m, train=(torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])))
    assert s.train.x.dtype == torch.float64
    emb = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 3))
    ids = torch.randint(0, 10, (5, 3))
    s = gp.Subject(emb, train=(ids, torch.tensor([0, 1, 2, 0, 1])))
    assert s.train.x.dtype == torch.int64 and torch.equal(s.train.x, ids)


def test_repr_is_a_short_summary():
    x, y = torch.randn(600, 4), torch.randint(0, 3, (600,))
    text = repr(gp.Subject(_model(), init={k: v + 1 for k, v in _model().state_dict().items()},
                           train=(x, y), test=(x, y)))
    assert len(text) < 300 and "Sequential" in text and "train 600" in text


def test_loading_a_run_leaves_the_global_rng_alone(tiny_run):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    gp.Subject.load(tiny_run)
    assert torch.equal(torch.get_rng_state(), before)


@pytest.fixture(scope="module")
def loaded_runs(tmp_path_factory):
    """A run of every zoo architecture, trained one epoch on a few digits and loaded from disk."""
    from genprobe.zoo import list_models
    from genprobe.zoo.train import TrainConfig, train_run

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    runs = {}
    try:
        for arch in list_models():
            options = {"fcn": {"width": 16, "depth": 1}, "cnn": {"channels": 4, "depth": 3},
                       "vgg": {"config": "4,M,8"}, "resnet": {"width": 4, "depth": 8},
                       "transformer": {}}.get(arch, {})
            config = TrainConfig(arch=arch, dataset="digits", epochs=1, n_train=120, n_test=40,
                                 batch_size=30, arch_options=options, device="cpu")
            runs[arch] = train_run(config, tmp_path_factory.mktemp(arch) / "run")
    finally:
        torch.set_num_threads(threads)
    return runs


def test_a_loaded_subject_model_carries_the_final_state(loaded_runs):
    for arch, run in loaded_runs.items():
        subject = gp.Subject.load(run)
        state = subject.model.state_dict()
        assert all(torch.equal(state[k], v) for k, v in subject.final.items()), arch
        assert not all(torch.equal(state[k], v) for k, v in subject.init.items()), arch


def test_every_probe_self_check_passes_on_a_loaded_run_of_every_architecture(loaded_runs):
    from genprobe.probes.registry import get_probe, list_probes

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for arch, run in loaded_runs.items():
            subject = gp.Subject.load(run)
            for name in list_probes():
                spec = get_probe(name)
                check = spec.function(subject, **spec.tiny).meta.get("self_check")
                if check is not None:
                    assert check["passed"], (arch, name, check)
    finally:
        torch.set_num_threads(threads)


def test_non_persistent_buffers_are_the_models_own():
    """A state is what state_dict() holds: a non-persistent buffer (a transformer's position ids)
    is never required (Subject(model, init=model.state_dict()) raised "final is missing key
    'position_ids'"), never in a state, and every forward uses the model's own value."""
    from foreign import Positions
    from genprobe.params import state_of

    torch.manual_seed(0)
    model = Positions().eval()
    x, y = torch.randn(12, 4, 6), torch.randint(0, 3, (12,))
    init = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.head.weight.add_(0.1)
    s = gp.Subject(model, init=init, train=(x, y), test=(x, y), num_classes=3)
    assert "position_ids" not in s.final and "position_ids" not in s.init
    assert "position_ids" not in state_of(model)
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(model(x), y)
    assert gp.evaluate(s.model, s.final, s.train).loss == pytest.approx(float(expected), rel=1e-6)
    r = gp.robustness(s, checkpoints=[0], draws=1)  # rewinding pos rewinds its weight only
    assert set(r.table.module) == {u.name for u in s.units()}
    assert torch.equal(model.position_ids, torch.arange(4))


class _Items(torch.utils.data.Dataset):
    """A map-style Dataset with one bad item (or none)."""

    def __init__(self, bad: str | None):
        self.bad = bad

    def __len__(self):
        return 6

    def __getitem__(self, i):
        if i == 4 and self.bad == "raises":
            raise OSError("corrupt file images/0004.png")
        if i == 4 and self.bad == "no label":
            return torch.randn(4)
        if i == 4 and self.bad == "shape":
            return torch.randn(5), 1
        return torch.randn(4), i % 3


@pytest.mark.parametrize("bad, message", [
    ("raises", r"train: reading item 4 of the dataset raised OSError: corrupt file images/0004.png"),
    ("no label", r"train: item 4 of the dataset is a Tensor, not an \(input, label\) pair"),
    ("shape", r"train: item 4's input is a tensor \(5,\) float32, item 0's a tensor \(4,\) "
              r"float32; every input must have the same structure and shapes")])
def test_a_bad_dataset_item_is_named(bad, message):
    with pytest.raises(DataError, match=message):
        gp.Subject(_model(), train=_Items(bad))
    assert len(gp.Subject(_model(), train=_Items(None)).train) == 6

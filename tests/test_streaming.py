"""Datasets read a batch at a time (``Subject(..., stream=True)``, or a Dataset too large for
memory): every probe gives what the in-memory path gives on the same examples, a probe that
samples reads only its sample, and a probe's peak memory stays far below the data's size."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap

import pandas as pd
import pytest
import torch
from torch import nn

import genprobe as gp
from genprobe import values
from genprobe.errors import ConfigError, DataError
from genprobe.inputs import Streamed
from genprobe.probes.registry import get_probe, list_probes

pytestmark = pytest.mark.usefixtures("one_thread")


class Generated(torch.utils.data.Dataset):
    """Images made on the fly from each index's own seed (nothing held), counting reads. With
    `targets`, the labels are an attribute as torchvision's datasets hold them; `mapping`: the
    input is ``{"image": ...}``."""

    def __init__(self, n: int, shape=(1, 6, 6), classes: int = 3, targets: bool = True,
                 mapping: bool = False):
        self.n, self.shape, self.classes, self.mapping = n, shape, classes, mapping
        self.labels = torch.arange(n) % classes
        if targets:
            self.targets = self.labels.tolist()
        self.reads: list[int] = []

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        self.reads.append(i)
        image = torch.randn(*self.shape, generator=torch.Generator().manual_seed(int(i))) + 0.3 * (i % self.classes)
        return ({"image": image} if self.mapping else image), int(self.labels[i])


class ByName(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))

    def forward(self, image):
        return self.net(image)


def moved() -> tuple[nn.Module, dict]:
    """A ByName network moved away from its initial state, and that state."""
    torch.manual_seed(0)
    model = ByName()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model, init


def subjects(stream_kwargs: dict, **dataset):
    model, init = moved()
    return [gp.Subject(model, init=init, train=Generated(60, **dataset), test=Generated(45, **dataset),
                       stream=stream) for stream in (True, False)]


@pytest.mark.parametrize("probe", list_probes())
@pytest.mark.parametrize("dataset", [{}, {"targets": False, "mapping": True}], ids=["targets", "mapping"])
def test_a_streamed_dataset_gives_what_the_in_memory_path_gives(probe, dataset):
    streamed, in_memory = subjects({}, **dataset)
    assert isinstance(streamed.train.x, Streamed) and not isinstance(in_memory.train.x, Streamed)
    assert torch.equal(streamed.train.y, in_memory.train.y)
    spec = get_probe(probe)
    a, b = spec.function(streamed, **spec.tiny), spec.function(in_memory, **spec.tiny)
    pd.testing.assert_frame_equal(a.table, b.table, check_exact=True)
    assert a.summary.keys() == b.summary.keys()
    assert all(a.summary[k] == b.summary[k] or (a.summary[k] != a.summary[k] and b.summary[k] != b.summary[k])
               for k in a.summary)


def test_a_probe_that_samples_reads_only_its_sample():
    data = Generated(2000)
    model = nn.Sequential(nn.Flatten(), nn.Linear(36, 8), nn.ReLU(), nn.Linear(8, 3))
    s = gp.Subject(model, train=data, test=Generated(10), stream=True)
    assert len(data.reads) <= 3  # item 0 (shapes), one example to check the model fits; labels from targets
    data.reads.clear()
    r = gp.ntk(s, n=12, n_test=0, checkpoints=[])
    assert sorted(data.reads[-12:]) == sorted(r.tensors["indices"].tolist())
    assert len(data.reads) <= 12 + 4, len(data.reads)  # the sample, and a few single examples


def test_a_dataset_too_large_for_memory_is_streamed_by_default(monkeypatch, caplog):
    monkeypatch.setattr(values, "available_memory", lambda device: 4 * 50 * 36 * 4 - 1)  # 4 × the data - 1
    model = nn.Sequential(nn.Flatten(), nn.Linear(36, 3))
    with caplog.at_level(logging.INFO, logger="genprobe.values"):
        s = gp.Subject(model, train=Generated(50))
    assert isinstance(s.train.x, Streamed)
    assert "50 items of 0.00687 MiB in all are streamed" in caplog.text
    monkeypatch.setattr(values, "available_memory", lambda device: 4 * 50 * 36 * 4)
    assert not isinstance(gp.Subject(model, train=Generated(50)).train.x, Streamed)


def test_bad_streamed_data_is_named_when_read():
    class Broken(Generated):
        def __getitem__(self, i):
            if i == 37:
                raise OSError("corrupt file images/0037.png")
            image, label = super().__getitem__(i)
            return image.fill_(float("nan")) if i == 41 else image, label

    model = nn.Sequential(nn.Flatten(), nn.Linear(36, 3))
    s = gp.Subject(model, train=Broken(50), test=Broken(50), stream=True)  # labels from targets
    with pytest.raises(DataError, match=r"test: reading item 37 of the dataset raised OSError: corrupt file"):
        gp.evaluate(s.model, s.final, s.test)
    with pytest.raises(DataError, match=r"train: 1 input\(s\) hold NaN or infinite values \(first at position 41\)"):
        gp.evaluate(s.model, s.final, s.train.subset(range(38, 50)))
    wrong = Generated(50)
    wrong.targets = wrong.targets[:49]
    with pytest.raises(DataError, match=r"train: the Dataset's targets hold \(49,\) labels for 50 items"):
        gp.Subject(model, train=wrong, stream=True)
    with pytest.raises(DataError, match=r"stream must be True, False or None"):
        gp.Subject(model, train=Generated(5), stream="yes")


@pytest.mark.parametrize("probe", ["robustness", "ablation", "activation_noise"])
def test_worker_processes_read_a_streamed_dataset_ahead_with_the_same_results(probe):
    model, init = moved()
    train, test = Generated(60), Generated(45)
    here, ahead = (gp.Subject(model, init=init, train=train, test=test, stream=True, workers=w)
                   for w in (0, 2))
    spec = get_probe(probe)
    train.reads.clear(), test.reads.clear()
    a = spec.function(ahead, **spec.tiny, batch_size=7)
    in_this_process = len(train.reads) + len(test.reads)  # the workers' reads are in theirs
    b = spec.function(here, **spec.tiny, batch_size=7)
    pd.testing.assert_frame_equal(a.table, b.table, check_exact=True)
    assert in_this_process < (len(train.reads) + len(test.reads) - in_this_process) / 4


def test_an_item_that_fails_in_a_worker_is_named_in_one_line():
    class Broken(Generated):
        def __getitem__(self, i):
            if i == 37:
                raise OSError("corrupt file images/0037.png")
            return super().__getitem__(i)

    model = nn.Sequential(nn.Flatten(), nn.Linear(36, 3))
    s = gp.Subject(model, test=Broken(50), stream=True, workers=2)
    with pytest.raises(DataError, match=r"^test: reading item 37 of the dataset raised OSError: corrupt file"):
        gp.evaluate(s.model, s.final, s.test, batch_size=8)
    assert gp.evaluate(s.model, s.final, s.test.subset(range(38, 50)), batch_size=8).n == 12
    with pytest.raises(ConfigError, match=r"workers must be an integer >= 0, got -1"):
        gp.Subject(model, test=Broken(50), stream=True, workers=-1)


PEAK = textwrap.dedent("""
    import resource, sys
    import torch
    from torch import nn
    import genprobe as gp
    sys.path.insert(0, "tests")
    from test_streaming import Generated

    torch.set_num_threads(1)
    torch.manual_seed(0)
    data = Generated(N, shape=(3, 96, 96), classes=10)
    model = nn.Sequential(nn.Conv2d(3, 4, 5, stride=4), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
                          nn.Flatten(), nn.Linear(64, 10))
    init = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    s = gp.Subject(model, init=init, test=data, stream=True)
    r = gp.robustness(s, checkpoints=[0], draws=1, memory_budget=BUDGET)
    m = gp.evaluate(s.model, s.final, s.test)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(after - before, len(data.reads), m.n)
""")


def test_peak_memory_of_a_probe_on_a_dataset_larger_than_its_budget_stays_under_it():
    """4,000 generated 3×96×96 images (422 MiB as float32) streamed through the robustness
    probe and an evaluation with a 32 MiB engine budget: from before the Subject is made, the
    process's peak memory grows by far less than the data (measured: 78–86 MiB; with
    stream=False, by 1,482 MiB: the items, their stack and the checks)."""
    n, budget = 4000, 32 * 2**20
    size = n * 3 * 96 * 96 * 4
    code = PEAK.replace("N,", f"{n},", 1).replace("BUDGET", str(budget))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={"OMP_NUM_THREADS": "1", "PATH": ""}, cwd=".")
    assert out.returncode == 0, out.stderr[-2000:]
    grown, reads, evaluated = map(int, out.stdout.split()[-3:])
    assert evaluated == n and reads >= 2 * n  # every image read at least twice, never kept
    assert grown < 4 * budget < size / 3, f"peak grew by {grown / 2**20:.0f} MiB"

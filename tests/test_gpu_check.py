"""benchmarks/gpu_check.py: its dry run on the CPU (the same code as the GPU run, tiny sizes)
writes the Markdown section and the JSON in the format RESULTS.md and the next session expect."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
sys.path.insert(0, str(SCRIPT.parent))

import gpu_check  # noqa: E402

HEADER = (
    "| case | size | genprobe (s) | plain implementation | plain (s) | ratio | goal | met | "
    "also | FLOPs genprobe / plain | genprobe of peak (FP32 / TF32) | plain of peak (FP32 / TF32) |"
)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(out), "--dry-run"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return proc, out


def test_the_dry_run_exits_0_and_prints_the_section(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = (out / "gpu_check.md").read_text()
    assert text in proc.stdout
    assert (out / "logs" / "tests.log").is_file()
    assert all((out / "logs" / f"{case}.log").is_file() for case in gpu_check.CASES)


def test_the_markdown_section(dry_run):
    _, out = dry_run
    lines = (out / "gpu_check.md").read_text().splitlines()
    assert lines[0].startswith(
        "## GPU check (dry run on the CPU: tiny sizes, not GPU numbers): cpu ("
    )
    assert lines[2].startswith("`python benchmarks/gpu_check.py OUT_DIR --dry-run`: device **cpu")
    assert "torch " in lines[2] and "TF32: matmul" in lines[2] and "peak: unknown" in lines[2]
    tests = next(line for line in lines if line.startswith("**CUDA tests**"))
    assert "GENPROBE_TEST_DEVICE=cpu pytest -m cuda tests/test_cuda.py" in tests
    assert " passed" in tests and "exit 0" in tests and "Failed" not in tests
    assert any(line.startswith("Host–device traffic (transfer tests):") for line in lines)
    table = lines.index(HEADER)
    columns = HEADER.count("|")
    assert lines[table + 1].count("|") == columns
    rows = lines[table + 2 : table + 2 + len(gpu_check.CASES)]
    for case, row in zip(gpu_check.CASES, rows, strict=True):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert row.count("|") == columns and cells[0] == gpu_check.TITLES[case], row
        assert cells[5].endswith("×") and float(cells[5][:-1]) > 0, row
        assert cells[6] == f"≥ {gpu_check.GOALS[case]:g}×" and cells[7] in ("**met**", "not met"), (
            row
        )
        assert cells[10] == cells[11] == "—", row  # no known peak on the CPU
    assert lines[-1] == "Failures: none."
    assert any(line.startswith("FLOPs: ") for line in lines)
    assert any(line.startswith("Agreement with the plain implementation: ") for line in lines)


def test_the_json(dry_run):
    _, out = dry_run
    report = json.loads((out / "gpu_check.json").read_text())
    assert {
        "mode",
        "date",
        "command",
        "device",
        "limits",
        "budget_s",
        "sizes",
        "tests",
        "cases",
        "seconds",
        "failed",
        "exit_code",
    } <= set(report)
    assert report["mode"] == "dry" and report["failed"] == [] and report["exit_code"] == 0
    device = report["device"]
    assert (
        device["requested"] == "cpu"
        and device["name"].startswith("cpu (")
        and device["error"] is None
    )
    assert isinstance(device["torch"], str) and isinstance(device["tf32_cudnn"], bool)
    assert device["peak"] == {
        "model": "unknown",
        "fp32_tflops": None,
        "tf32_tflops": None,
        "source": None,
    }
    tests = report["tests"]
    assert tests["ok"] is True and tests["exit_code"] == 0 and tests["error"] is None
    assert isinstance(tests["counts"]["passed"], int) and tests["counts"]["passed"] > 0
    assert tests.get("counts", {}).get("failed", 0) == 0 and tests["failed_tests"] == []
    assert tests["transfers"] and all(t["ok"] and t["device"] == "cpu" for t in tests["transfers"])
    assert set(report["cases"]) == set(gpu_check.CASES)
    for case, r in report["cases"].items():
        assert r["ok"] is True and r["error"] is None, (case, r.get("error"))
        assert (
            r["name"] == case and r["goal"] == gpu_check.GOALS[case] and isinstance(r["size"], str)
        )
        assert isinstance(r["ratio"], float) and r["ratio"] > 0 and isinstance(r["met"], bool)
        assert r["met"] == (r["ratio"] >= r["goal"])
        for method in [r["genprobe"], r["plain"], *r["others"]]:
            assert isinstance(method["label"], str) and method["seconds"] > 0
            assert method["flops"] is None or method["flops"] > 0
            assert method["of_peak"] == {"fp32": None, "tf32": None}
        assert r["genprobe"]["flops"] and r["plain"]["flops"], case  # counted in the dry run too
        assert r["check"]["passed"] is True and isinstance(r["check"]["value"], float)
        assert r["wall_s"] > 0 and isinstance(r["flops_what"], str)


def test_a_case_past_its_limit_is_recorded_and_the_report_says_so(tmp_path):
    """A case that does not finish in time is stopped, recorded as failed with the reason, and
    drawn as a failed row (the run goes on with the others: see main)."""
    (tmp_path / "logs").mkdir()
    result = gpu_check.run_case("robustness", "dry", "cpu", tmp_path, limit=0.01)
    assert result["error"] == "timed out after 0 s (the case's limit)"
    report = {
        "mode": "gpu",
        "date": "today",
        "seconds": 1.0,
        "tests": None,
        "device": gpu_check.device_info("cpu") | {"name": "NVIDIA H100 80GB HBM3"},
        "cases": {
            "robustness": gpu_check.finish_case(
                "robustness", result, gpu_check.peak_of("NVIDIA H100 80GB HBM3")
            )
        },
    }
    assert report["cases"]["robustness"]["ok"] is False
    text = gpu_check.markdown(report)
    assert "| robustness map | — | — | — | — | — | ≥ 5× | failed |" in text
    assert "- **robustness map**: timed out after 0 s (the case's limit)" in text
    assert "- **criticality**: not run" in text


def test_a_disagreement_is_a_failure():
    result = {
        "genprobe": {"label": "g", "seconds": 1.0, "flops": 67e12},
        "plain": {"label": "p", "seconds": 60.0, "flops": None},
        "others": [],
        "check": {"what": "max", "value": 0.5, "limit": 0.01},
    }
    done = gpu_check.finish_case("stiffness", result, gpu_check.peak_of("NVIDIA H200"))
    assert (
        done["ok"] is False
        and "disagrees" in done["error"]
        and done["ratio"] == 60.0
        and done["met"]
    )
    assert done["genprobe"]["of_peak"] == {"fp32": 1.0, "tf32": pytest.approx(67 / 494.5)}
    assert done["plain"]["of_peak"] == {"fp32": None, "tf32": None}


@pytest.mark.parametrize(
    "name, model",
    [
        ("NVIDIA H100 80GB HBM3", "H100 SXM"),
        ("NVIDIA H100 PCIe", "H100 PCIe"),
        ("NVIDIA H100 NVL", "H100 NVL"),
        ("NVIDIA H200", "H200 SXM"),
        ("NVIDIA H200 NVL", "H200 NVL"),
        ("NVIDIA A100-SXM4-80GB", "unknown"),
        ("cpu (AMD EPYC)", "unknown"),
    ],
)
def test_the_peak_is_looked_up_by_torch_s_device_name(name, model):
    peak = gpu_check.peak_of(name)
    assert peak["model"] == model
    if model.endswith("SXM"):
        assert (peak["fp32_tflops"], peak["tf32_tflops"]) == (67.0, 494.5)


@pytest.mark.skipif(gpu_check.torch.cuda.is_available(), reason="a CUDA device is present")
def test_without_cuda_the_gpu_run_says_so_and_exits_2(tmp_path, capsys):
    assert gpu_check.main([str(tmp_path)]) == 2
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["exit_code"] == 2 and report["tests"] is None
    assert set(report["failed"]) == set(gpu_check.CASES)
    text = (tmp_path / "gpu_check.md").read_text()
    assert "**Device missing**: device 'cuda' asked for, but CUDA is not available" in text
    assert text.count("| failed |") == len(gpu_check.CASES)

"""Test matrix: a core subset of the suite against the oldest and the newest supported transformers.

CI runs only ``python -m pytest -q``, so the matrix is this test: for each bound it makes a throwaway venv in tmp
(``--system-site-packages``, so torch, peft, trl... are the installed ones), pip-installs that transformers, and
runs the subset in a subprocess with it. The lower bound is read from pyproject.toml's ``transformers>=X,<6``;
NEWEST is the newest release checked (bump it with pyproject when a newer one passes). The oldest bound is set by
the families hf_moeprune registers: ``import hf_moeprune`` fails on 5.22.x (no ``dots3_note_text`` causal LM;
5.18: ``bailing_hybrid``; 5.0-5.12: ``axk1``).

Nothing is cached outside tmp (pip's cache, HF_HOME and pytest's cache are off or in tmp). Needs the package
registry; without it the test fails (naming pip's error), it does not skip.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import transformers
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
NEWEST = "5.25.0"
# compat's own checks, the pruned format round trip (stock export, legacy keys, trust_remote_code), surgery
# invariants, and the trainer's private checkpoint overrides (resume after pruning)
SUBSET = [
    "tests/test_compat.py",
    "tests/test_format.py::test_loading_builds_pruned_shapes_directly",
    "tests/test_format.py::test_mixtral_stock_export_writes_legacy_keys_and_pruned_format_writes_fused",
    "tests/test_format.py::test_roundtrip_with_trust_remote_code_without_package[mixtral]",
    "tests/test_surgery.py::test_removing_unselected_experts_keeps_logits[mixtral]",
    "tests/test_surgery.py::test_removing_unselected_experts_keeps_logits[qwen3_moe]",
    "tests/test_surgery.py::test_prune_removes_every_per_expert_tensor[deepseek_v3]",
    "tests/test_trainer.py::test_resume_after_pruning_matches_uninterrupted_run",
]


def oldest_supported() -> str:
    text = (ROOT / "pyproject.toml").read_text()
    match = re.search(r'"transformers>=([0-9.]+),<6"', text)
    assert match, 'pyproject.toml must declare "transformers>=X,<6"'
    return match.group(1)


def _run(cmd: list[str], env: dict[str, str], timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.parametrize("bound", ["oldest", "newest"])
def test_core_suite_on_transformers_bound(bound, tmp_path):
    version = oldest_supported() if bound == "oldest" else NEWEST
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),  # this checkout, not an installed copy
        "HF_HOME": str(tmp_path / "hf"),
        "PIP_NO_CACHE_DIR": "1",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
    }
    if Version(transformers.__version__) == Version(version):
        python = sys.executable  # the bound is what is installed: run the subset with it directly
    else:
        venv = tmp_path / "venv"
        made = _run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], env, 120)
        assert made.returncode == 0, f"venv creation failed:\n{made.stderr}"
        python = str(venv / "bin" / "python")
        pip = _run([python, "-m", "pip", "install", "-q", f"transformers=={version}"], env, 600)
        assert pip.returncode == 0, f"pip install transformers=={version} failed:\n{pip.stdout}\n{pip.stderr}"
    found = _run([python, "-c", "import transformers, hf_moeprune; print(transformers.__version__)"], env, 300)
    assert found.returncode == 0, f"import hf_moeprune fails with transformers {version}:\n{found.stderr[-3000:]}"
    assert Version(found.stdout.strip()) == Version(version), found.stdout
    result = _run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", *SUBSET], env, 900)
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0, f"core suite fails with transformers {version}:\n{result.stdout[-6000:]}"
    assert re.search(r"\d+ passed", summary) and "skipped" not in summary, summary

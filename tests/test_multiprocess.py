import json
import os
import subprocess
import sys

import pytest

SCRIPTS = os.path.join(os.path.dirname(__file__), "scripts")


def torchrun(script: str, *args: str, nproc: int = 2, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    # --standalone: a local rendezvous on a free port, so parallel test runs never collide
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               os.path.join(SCRIPTS, script), *args]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)


@pytest.mark.multiprocess
def test_two_processes_remove_the_same_experts(tmp_path):
    result = torchrun("ddp_prune.py", str(tmp_path))
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    a, b = ranks
    assert a["world_size"] == 2 and "MULTI_CPU" in a["distributed_type"]
    assert a["wrapper"] == "DistributedDataParallel" and a["rewrapped"]
    # each rank saw different data ...
    assert a["local_tokens"] != b["local_tokens"]
    # ... yet both took the same decisions at the same steps, from the reduced statistics
    assert a["events"] == b["events"] and a["events"]
    assert a["kept_expert_ids"] == b["kept_expert_ids"]
    assert sum(len(ids) for ids in a["kept_expert_ids"]) == 12
    # DDP kept working after the shapes changed: training ran to the end with synchronised weights
    assert a["global_step"] == b["global_step"] == 8
    assert a["weights_sha256"] == b["weights_sha256"]

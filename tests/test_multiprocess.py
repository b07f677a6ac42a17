import json
import os
import subprocess
import sys

import pytest

SCRIPTS = os.path.join(os.path.dirname(__file__), "scripts")


def torchrun(
    script: str, *args: str, nproc: int = 2, timeout: int = 600, env: dict | None = None
) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **(env or {}))
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
    # after the rebuild, gradient accumulation still skips the all-reduce on non-final micro-steps ...
    assert a["allreduce_on_sync_step"] and all(a["allreduce_on_sync_step"])
    # ... and the replaced full-size expert tensors are freed during training (no stale wrapper keeps them)
    for rank in (a, b):
        assert rank["original_experts_alive_after_removal"] and not any(rank["original_experts_alive_after_removal"])


@pytest.mark.multiprocess
def test_rebalanced_model_under_transformers_expert_parallelism(workspace, tmp_path):
    """`hf-moeprune balance`, then the real transformers EP engine (DistributedConfig(ep_size=2), gloo): every
    rank's experts compute exactly the token count the plan predicted, and outputs do not change."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_moeprune import prune_experts
    from hf_moeprune.commands import main

    # a pruned model whose layers keep different counts (8, 6, 4): EP shards each layer on its own
    model = AutoModelForCausalLM.from_pretrained(workspace / "model")
    prune_experts(model, {0: list(range(6)), 2: [1, 3, 5, 7]})
    model.save_pretrained(tmp_path / "pruned")
    AutoTokenizer.from_pretrained(workspace / "model").save_pretrained(tmp_path / "pruned")
    assert main(["balance", str(tmp_path / "pruned"), "--output_dir", str(tmp_path / "rebalanced"), "--data",
                 str(workspace / "data.jsonl"), "--text_field", "body", "--block_size", "32"]) == 0  # fmt: skip
    placement = json.loads((tmp_path / "rebalanced" / "placement.json").read_text())

    example = os.path.join(os.path.dirname(SCRIPTS), "..", "examples", "expert_parallel.py")
    result = torchrun(example, "--original", str(tmp_path / "pruned"), "--rebalanced", str(tmp_path / "rebalanced"),
                      "--report", str(tmp_path / "report.json"))  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["world_size"] == report["ep_size"] == 2
    tokens = placement["calibration"]["blocks"] * placement["calibration"]["block_size"]
    assert [row["layer"] for row in report["layers"]] == [0, 1, 2]
    for row in report["layers"]:
        # measured inside the engine, per rank, equals the plan's device loads (token counts, exactly)
        assert row["measured_before"] == [int(v) for v in row["planned_before"]]
        assert row["measured_after"] == [int(v) for v in row["planned_after"]]
        assert sum(row["measured_after"]) == sum(row["measured_before"]) == 2 * tokens  # top-2
        assert max(row["measured_after"]) <= max(row["measured_before"])
    assert [r["planned_after"] for r in report["layers"]] == placement["device_loads_after"]
    assert any(r["balancedness_after"] > r["balancedness_before"] + 0.05 for r in report["layers"])
    # rebalanced under EP == original under EP == original in one process (float tolerance: EP sums differently)
    assert report["max_abs_logit_diff_rebalanced_vs_original_ep"] < 1e-5
    assert report["max_abs_logit_diff_rebalanced_ep_vs_original_single_process"] < 1e-5


@pytest.mark.multiprocess
def test_fsdp2_expert_surgery_equals_unsharded_surgery(tmp_path):
    """prune_experts/permute_experts on a fully_shard model (2 CPU ranks, gloo): gathered weights, AdamW moments
    and logits equal the same surgery on an unsharded copy; the shards are re-split; training continues."""
    result = torchrun("fsdp2_prune.py", str(tmp_path), timeout=120)
    assert result.returncode == 0, result.stderr[-4000:]
    a, b = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert a["world"] == 2
    for rank in (a, b):
        assert rank["sharded_after"]  # still FSDP2 DTensors, not gathered copies
        assert rank["global_shape_after"] == [5, 96, 32]
        assert rank["experts_per_layer"] == [5, 8, 4]
        assert rank["kept_expert_ids"] == [[6, 1, 4, 3, 7], [7, 6, 5, 4, 3, 2, 1, 0], [2, 5, 0, 7]]
        assert rank["weights_equal"] and rank["moments_equal"] and rank["optimizer_holds_new_params"]
        assert "model.layers.0.mlp.experts.gate_up_proj" in rank["moment_names"]
        assert rank["logits_equal"], rank["max_logit_diff"]
        # kept experts keep training, in step with the unsharded reference on the same global batch
        assert all(rank["experts_changed_after_removal"])
        assert rank["max_weight_diff_after_training"] < 1e-5
    # 8 rows were split 4 + 4; the 5 kept rows are re-split 3 + 2 (FSDP2 pads the uneven shard)
    assert (a["local_rows_before"], b["local_rows_before"]) == (4, 4)
    assert (a["local_rows_after"], b["local_rows_after"]) == (3, 2)
    assert a["weights_digest"] == b["weights_digest"]


@pytest.mark.multiprocess
def test_deepspeed_is_refused_before_training(tmp_path):
    """DeepSpeed keeps its own flat partitions of parameters and optimizer state, which do not follow a removal (the
    MoE layers would silently stop training): ZeRO-2 with removal and ZeRO-3 are refused at construction, naming
    the setup; ZeRO-3's empty placeholders never reach the pruned-config check."""
    pytest.importorskip("deepspeed")
    result = torchrun("deepspeed_refused.py", str(tmp_path), timeout=240, env={"DS_ACCELERATOR": "cpu"})
    assert result.returncode == 0, result.stderr[-4000:]
    for rank in range(2):
        zero2, zero3 = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert zero2["refused"] and "DeepSpeed ZeRO-2" in zero2["message"] and "FSDP2" in zero2["message"]
        assert zero3["placeholders"]  # the model really was partitioned by zero.Init
        assert zero3["refused"] and "DeepSpeed ZeRO-3" in zero3["message"]
        assert "experts_per_layer" not in zero3["message"]


@pytest.mark.multiprocess
def test_trainer_removes_experts_under_transformers_expert_parallelism(tmp_path):
    """MoEPruneTrainer on a model loaded with load_expert_parallel (ep_size=2, gloo): a removal during training
    slices every rank's local experts (8 -> 6 per layer, 3 per rank), re-places them by load (weights follow their
    ids across ranks), training continues, and the result computes exactly what the same weights do unsharded."""
    result = torchrun("ep_prune_train.py", str(tmp_path), timeout=180)
    assert result.returncode == 0, result.stderr[-4000:]
    a, b = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert a["events"] == b["events"] and a["events"]
    assert a["kept_expert_ids"] == b["kept_expert_ids"]
    for rank in (a, b):
        assert rank["uneven_refused"]  # prune_experts to 5 of 8 under ep_size=2: refused, model untouched
        assert rank["global_step"] == 5
        assert rank["experts_per_layer"] == [6, 6, 6]  # divisible by ep_size, as balance_ep_size=2 keeps them
        assert rank["local_experts_before"] == [4, 4, 4] and rank["local_experts_after"] == [3, 3, 3]
        assert rank["local_rows"] == [3, 3, 3] and rank["dispatch_local"] == [[3, 3]] * 3
        assert rank["weights_followed_ids"]
        assert any(rank["order_changed"])  # the load-aware re-placement moved experts between ranks
        assert rank["balancedness"]
        assert all(changed == 6 for changed in rank["kept_changed_after_removal"])
        assert not rank["reference_missing"] and not rank["reference_unexpected"]
        assert rank["max_logit_diff_vs_unsharded"] < 1e-5

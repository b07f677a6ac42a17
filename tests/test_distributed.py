"""Single-process checks of the distributed-setup guards (the multi-process runs are in test_multiprocess.py)."""

import json

import pytest
import torch

from hf_moeprune.demo.tiny_models import tiny_model
from hf_moeprune.distributed import DistributedSetupError, check_trainer_setup, deepspeed_setup, is_sharded


class Args:
    def __init__(self, deepspeed=None, prune_target=0.25):
        self.deepspeed, self.prune_target = deepspeed, prune_target


def test_deepspeed_setup_names_stage_and_source(tmp_path, monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    assert deepspeed_setup(Args()) is None
    assert deepspeed_setup(Args({"zero_optimization": {"stage": 2}})) == "DeepSpeed ZeRO-2 (dict)"
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    assert deepspeed_setup(Args(str(path))) == f"DeepSpeed ZeRO-3 ({path})"
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    assert deepspeed_setup(Args()) == "DeepSpeed ZeRO-2 (accelerate config)"


def test_trainer_guard_refuses_removal_under_deepspeed(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    model = tiny_model("mixtral")
    check_trainer_setup(model, Args())  # no DeepSpeed: nothing to refuse
    with pytest.raises(DistributedSetupError, match=r"DeepSpeed ZeRO-2 \(dict\).*silently stop training"):
        check_trainer_setup(model, Args({"zero_optimization": {"stage": 2}}))
    check_trainer_setup(model, Args({"zero_optimization": {"stage": 2}}, prune_target=0.0))  # removes nothing
    with pytest.raises(DistributedSetupError, match="ZeRO-3"):
        check_trainer_setup(model, Args({"zero_optimization": {"stage": 3}}, prune_target=0.0))
    model.model.layers[0].mlp.gate.weight.ds_id = 7  # what zero.Init leaves on every parameter
    with pytest.raises(DistributedSetupError, match="zero.Init"):
        check_trainer_setup(model, Args())


def test_plain_tensors_are_not_sharded():
    assert not is_sharded(torch.zeros(2)) and not is_sharded(None)


def test_trainer_guard_asks_for_balance_ep_size_under_expert_parallelism(monkeypatch):
    from types import SimpleNamespace

    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    model = tiny_model("mixtral")
    for layer in model.model.layers:  # what transformers' expert parallelism leaves on the experts (ep_size=2)
        layer.mlp.experts._is_expert_parallel = True
        layer.mlp.experts.gate_up_proj.device_mesh = SimpleNamespace(size=lambda: 2)
    args = Args()
    with pytest.raises(DistributedSetupError, match="ep_size=2, but balance_ep_size=0: set balance_ep_size=2"):
        check_trainer_setup(model, args)
    args.balance_ep_size = 2
    check_trainer_setup(model, args)

"""Every helper of hf_moeprune.compat checked against the installed transformers / torch / peft.

Each test asserts that the private internal still exists *and* behaves as hf_moeprune assumes, so an upgrade that
moves one fails here (and in tests/test_transformers_matrix.py for the oldest/newest supported transformers).
"""

import dataclasses
import inspect

import pytest
import torch
import torch.distributed as dist
import torch.nn.utils.parametrize as parametrize
import transformers
from torch import nn
from transformers import HfArgumentParser, MixtralConfig, MixtralForCausalLM, Trainer, TrainingArguments

from hf_moeprune import compat
from hf_moeprune.format.modeling_moeprune import PRUNED_CLASSES, make_pruned_classes


def _tiny_mixtral(seed: int = 0) -> MixtralForCausalLM:
    torch.manual_seed(seed)
    config = MixtralConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=32,
    )
    return MixtralForCausalLM(config).eval()


# -- argparse ------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Args:
    model: str = dataclasses.field(metadata={"help": "required"})
    steps: int = 1


def test_parser_actions_relax_required():
    parser = HfArgumentParser(_Args)
    actions = {a.dest: a for a in compat.parser_actions(parser)}
    assert actions["model"].required and not actions["steps"].required
    with pytest.raises(SystemExit):
        parser.parse_args_into_dataclasses(args=[])
    actions["model"].required = False  # what utils.parse_args does for fields a recipe supplies
    parser.set_defaults(model="m")
    (args,) = parser.parse_args_into_dataclasses(args=[])
    assert args.model == "m"


# -- model / config classes -------------------------------------------------------------------------------------------
def test_swap_class_keeps_parameters_and_hooks():
    model = _tiny_mixtral()
    config_cls, model_cls = PRUNED_CLASSES["mixtral"]
    params = dict(model.named_parameters())
    calls = []
    model.model.layers[0].register_forward_hook(lambda *a: calls.append(1))
    x = torch.tensor([[1, 2, 3]])
    before = model(x).logits
    compat.swap_class(model.config, config_cls)
    compat.swap_class(model, model_cls)
    assert type(model) is model_cls and type(model.config) is config_cls
    assert isinstance(model, MixtralForCausalLM)
    assert all(p is params[n] for n, p in model.named_parameters())
    assert torch.equal(MixtralForCausalLM.forward(model, x).logits, before)
    assert len(calls) == 2


def test_weight_conversions_are_remembered_by_from_pretrained(tmp_path):
    _tiny_mixtral().save_pretrained(tmp_path)
    loaded = MixtralForCausalLM.from_pretrained(tmp_path)
    # transformers keeps the checkpoint's key renamings on the instance, where forget_weight_conversions looks
    assert "_weight_conversions" in loaded.__dict__
    assert loaded.__dict__["_weight_conversions"]  # Mixtral's per-expert w1/w2/w3 <-> fused tensors
    compat.forget_weight_conversions(loaded)
    assert "_weight_conversions" not in loaded.__dict__
    compat.forget_weight_conversions(loaded)  # idempotent
    # every parameter the checkpoint filled carries the loader's flag that is_hf_initialized reads
    assert all(compat.is_hf_initialized(p) for p in loaded.parameters())
    assert not compat.is_hf_initialized(torch.zeros(1))


def test_experts_implementation_getter_and_internal_setter():
    model = _tiny_mixtral()
    model.set_experts_implementation("eager")
    assert compat.experts_implementation(model.config) == "eager"
    compat.set_experts_implementation_internal(model.config, "grouped_mm")
    assert compat.experts_implementation(model.config) == "grouped_mm"
    assert compat.experts_implementation(object()) is None


def test_experts_registry_and_eager_forward():
    registry = compat.experts_functions()
    assert "grouped_mm" in registry
    assert callable(registry.register) and callable(registry.get_interface)
    model = _tiny_mixtral()
    experts = model.model.layers[0].mlp.experts
    eager = compat.experts_eager_forward(type(experts))
    assert eager is not None and eager is not type(experts).forward
    assert compat.experts_eager_forward(nn.Linear) is None
    # the counting kernel asks get_interface(name, default) for "eager" and gets the unwrapped forward back; and the
    # dispatcher under "eager" computes what the unwrapped forward computes
    assert registry.get_interface("eager", eager) is eager
    model.set_experts_implementation("eager")
    hidden = torch.randn(5, 16)
    top_k_index = torch.tensor([[0, 1], [1, 2], [2, 3], [3, 0], [0, 2]])
    top_k_weights = torch.rand(5, 2)
    with torch.no_grad():
        assert torch.equal(
            experts(hidden, top_k_index, top_k_weights), eager(experts, hidden, top_k_index, top_k_weights)
        )


def test_hf_peft_adapter_flag():
    # transformers sets the flag in add_adapter (which needs a newer peft than the one installed here) and
    # save_pretrained reads it to save only the adapter: check both still use this attribute name
    from transformers.integrations.peft import PeftAdapterMixin

    assert "self._hf_peft_config_loaded = True" in inspect.getsource(PeftAdapterMixin.load_adapter)
    assert "_hf_peft_config_loaded" in inspect.getsource(transformers.PreTrainedModel.save_pretrained)
    model = _tiny_mixtral()
    assert not compat.hf_peft_adapter_flag(model)
    compat.set_hf_peft_adapter_flag(model, True)
    assert compat.hf_peft_adapter_flag(model) is True and model._hf_peft_config_loaded is True
    compat.set_hf_peft_adapter_flag(model, False)
    assert compat.hf_peft_adapter_flag(model) is False


def test_compiled_inner():
    module = nn.Linear(2, 2)
    compiled = torch.compile(module)  # lazy: nothing is compiled until called
    assert compat.compiled_inner(compiled) is module
    assert compat.compiled_inner(module) is None


def test_modeling_file_private_apis_still_hold():
    """format/modeling_moeprune.py cannot import compat (it runs under trust_remote_code): check its internals here."""
    assert compat.MODELING_FILE_PRIVATE_APIS
    _, model_cls = make_pruned_classes("MixtralConfig", "MixtralForCausalLM")
    for probe in ("_can_set_attn_implementation", "_can_set_experts_implementation"):
        assert callable(getattr(MixtralForCausalLM, probe))
        assert isinstance(getattr(model_cls, f"{probe}_cached_value"), bool)
    assert MixtralForCausalLM._can_set_experts_implementation() is True
    assert callable(MixtralForCausalLM._init_weights)
    module = nn.Module()
    module.register_buffer("a", torch.zeros(1), persistent=False)
    module.register_buffer("b", torch.zeros(1))
    assert module._non_persistent_buffers_set == {"a"}
    config = MixtralConfig()
    config.allow_global_per_layer_attribute_access = True
    assert vars(config)["allow_global_per_layer_attribute_access"] is True
    assert config.to_dict()["allow_global_per_layer_attribute_access"] is True
    vars(config).pop("allow_global_per_layer_attribute_access")
    assert not config.allow_global_per_layer_attribute_access
    assert "allow_global_per_layer_attribute_access" not in config.to_dict()


# -- Trainer ----------------------------------------------------------------------------------------------------------
def test_trainer_overrides_match_transformers():
    compat.check_trainer_overrides()
    import trl

    compat.check_trainer_overrides(trl.SFTTrainer)  # MoEPruneSFTTrainer overrides the same methods


def test_trainer_override_check_fails_loudly():
    class Moved(Trainer):
        def _save(self, output_dir=None, state_dict=None, safe_serialization=True):
            pass

    Moved._load_from_checkpoint = None
    with pytest.raises(compat.CompatError, match=rf"transformers {transformers.__version__}") as info:
        compat.check_trainer_overrides(Moved)
    assert "Moved._load_from_checkpoint is missing" in str(info.value)
    assert "Moved._save('output_dir', 'state_dict', 'safe_serialization')" in str(info.value)


def test_trainer_output_dir(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path / "run"), report_to=[], use_cpu=True)
    trainer = Trainer(model=_tiny_mixtral(), args=args)
    assert compat.trainer_output_dir(trainer, None) == str(tmp_path / "run")


# -- nn.Module internals ----------------------------------------------------------------------------------------------
def test_child_module_bypasses_getattr():
    parent = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    new = nn.Tanh()
    assert compat.child_module(parent, "1") is parent[1]
    assert compat.child_module(parent, "nope") is None
    compat.set_child_module(parent, "1", new)
    assert parent[1] is new and [n for n, _ in parent.named_children()] == ["0", "1"]


def test_buffers_table():
    module = nn.Module()
    module.register_buffer("a", torch.zeros(2), persistent=False)
    module.register_buffer("b", torch.zeros(2))
    module.register_buffer("c", None)
    assert list(compat.own_buffers(module)) == ["a", "b", "c"]
    assert not compat.buffer_is_persistent(module, "a") and compat.buffer_is_persistent(module, "b")
    compat.set_buffer(module, "a", torch.ones(3))
    assert torch.equal(module.a, torch.ones(3)) and "a" not in module.state_dict()
    assert not compat.buffer_is_persistent(module, "a")


class _Double(nn.Module):
    calls = 0

    def forward(self, x):
        return 2 * x

    def right_inverse(self, x):
        _Double.calls += 1
        return x / 2


def test_replace_parametrization_original_skips_right_inverse():
    linear = nn.Linear(2, 2, bias=False)
    parametrize.register_parametrization(linear, "weight", _Double())
    chain = linear.parametrizations["weight"]
    calls = _Double.calls
    compat.replace_parametrization_original(chain, "original", nn.Parameter(torch.ones(3, 2), requires_grad=False))
    assert _Double.calls == calls
    assert torch.equal(linear.weight, torch.full((3, 2), 2.0))


def test_parametrize_cache_counter():
    linear = nn.Linear(2, 2, bias=False)
    parametrize.register_parametrization(linear, "weight", _Double())
    assert parametrize._cache_enabled == 0
    compat.enter_parametrize_cache()
    compat.enter_parametrize_cache()
    try:
        assert linear.weight is linear.weight  # cached while enabled
        compat.exit_parametrize_cache()
        assert parametrize._cache and linear.weight is linear.weight  # still inside the outer one
    finally:
        compat.exit_parametrize_cache()
    assert parametrize._cache == {} and linear.weight is not linear.weight
    compat.exit_parametrize_cache()  # an unmatched exit (forward raised before the pre-hook) stays at 0
    assert parametrize._cache_enabled == 0


# -- packed CPU kernels -------------------------------------------------------------------------------------------
def test_packed_kernels_compute_the_dequantized_product():
    assert compat.packed_kernels_available()
    for name in compat.PACKED_KERNEL_OPS:
        assert hasattr(torch.ops.aten, name)
    torch.manual_seed(0)
    out_features, in_features, group = 16, 64, 32
    x = torch.randn(3, in_features).to(torch.bfloat16)
    # int8: one scale per output channel
    w8 = torch.randint(-127, 128, (out_features, in_features), dtype=torch.int8)
    s8 = torch.rand(out_features).to(torch.bfloat16) / 50
    ref8 = x.float() @ (w8.float() * s8.float()[:, None]).t()
    torch.testing.assert_close(compat.int8pack_mm(x, w8, s8).float(), ref8, rtol=2e-2, atol=2e-2)
    # int4: (q - 8) * scale + zero per group of the input dim
    q = torch.randint(0, 16, (out_features, in_features), dtype=torch.int32)
    scales = (torch.rand(in_features // group, out_features) / 50).to(torch.bfloat16)
    scales_and_zeros = torch.stack((scales, torch.zeros_like(scales)), dim=-1).contiguous()
    packed = compat.convert_weight_to_int4pack(q, 2)
    dense = (q.float() - 8) * scales.float().t().repeat_interleave(group, dim=1)
    ref4 = x.float() @ dense.t()
    torch.testing.assert_close(
        compat.int4pack_mm(x, packed, group, scales_and_zeros).float(), ref4, rtol=2e-2, atol=2e-2
    )


# -- torch.distributed: DDP and FSDP2 (one process, gloo) -----------------------------------------------------------
@pytest.fixture
def single_process_group():
    if not dist.is_available():
        pytest.fail("torch was built without torch.distributed, which hf_moeprune's DDP/FSDP2 support needs")
    assert not dist.is_initialized()
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_rebuild_ddp_in_place(single_process_group):
    module = nn.Sequential(nn.Linear(4, 4))
    wrapped = nn.parallel.DistributedDataParallel(module, find_unused_parameters=True, bucket_cap_mb=1)
    module[0].weight = nn.Parameter(torch.randn(4, 4))  # what expert surgery does
    old_reducer = wrapped.reducer
    compat.rebuild_ddp(wrapped, module)
    assert wrapped.module is module and wrapped.reducer is not old_reducer
    assert wrapped.find_unused_parameters and wrapped.bucket_bytes_cap == 1024 * 1024
    assert any(p is module[0].weight for p in wrapped.parameters())
    wrapped(torch.randn(2, 4)).sum().backward()
    assert module[0].weight.grad is not None


def test_fsdp2_param_reinit(single_process_group):
    from torch.distributed.fsdp import fully_shard

    module = nn.Sequential(nn.Linear(4, 8, bias=False))
    fully_shard(module)
    module(torch.randn(2, 4)).sum().backward()  # lazy init (names the parameters), then back to sharded
    module.reshard()
    group = compat.fsdp_param_group(module)
    (fsdp_param,) = group.fsdp_params
    assert compat.fsdp_param_is_resharded(fsdp_param)
    assert compat.fsdp_param_fqn(fsdp_param) == "0.weight"
    assert compat.fsdp_unsharded_dtensor_spec(fsdp_param) is None
    assert compat.fsdp_unsharded_dtensor_spec(None) is None
    full = torch.randn(6, 4)  # fewer rows (experts), as after a removal
    new = compat.reinit_fsdp_param(fsdp_param, nn.Parameter(full.clone()))
    assert module[0].weight is new and tuple(new.shape) == (6, 4)
    assert torch.equal(new.full_tensor(), full)
    x = torch.randn(2, 4)
    torch.testing.assert_close(module(x), x @ full.t())  # all-gathers the new shape
    assert not compat.fsdp_param_is_resharded(fsdp_param)
    module.reshard()
    assert compat.fsdp_param_is_resharded(fsdp_param) and tuple(module[0].weight.shape) == (6, 4)


def test_expert_parallel_markers():
    experts = _tiny_mixtral().model.layers[0].mlp.experts
    assert not compat.is_expert_parallel(experts)
    assert compat.ep_dispatches(experts) == []
    from transformers.distributed.expert_parallel import EPImplementation

    assert inspect.isclass(EPImplementation)


# -- checkpoint key conversions ---------------------------------------------------------------------------------------
def test_key_conversions_round_trip(tmp_path):
    from safetensors.torch import load_file

    model = _tiny_mixtral()
    model.save_pretrained(tmp_path)
    on_disk = load_file(str(tmp_path / "model.safetensors"))
    assert any(".experts.0.w1." in k for k in on_disk)  # Mixtral saves the legacy per-expert names
    conversions = compat.load_conversions(model)
    meta = model.state_dict()
    key = next(k for k in on_disk if k.endswith("layers.0.block_sparse_moe.experts.0.w1.weight"))
    assert (
        compat.converted_key(key, conversions, model.base_model_prefix, meta)
        == "model.layers.0.mlp.experts.gate_up_proj"
    )
    layer0 = {k: v for k, v in on_disk.items() if ".layers.0.block_sparse_moe.experts." in k}
    fused = compat.apply_load_conversions(model, conversions, meta, dict(layer0))  # it empties the dict it gets
    assert set(fused) == {"model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj"}
    for name, value in fused.items():
        assert torch.equal(value, meta[name])
    reverted = compat.revert_conversions(model, fused)
    assert set(reverted) == set(layer0)
    for name, value in reverted.items():
        assert torch.equal(value, layer0[name])


# -- peft ---------------------------------------------------------------------------------------------------------------
def test_peft_param_ndim():
    import peft

    model = _tiny_mixtral()
    config = peft.LoraConfig(r=2, target_modules=[], target_parameters=["mlp.experts.gate_up_proj"])
    wrapped = peft.get_peft_model(model, config)
    wrappers = [m for m in wrapped.modules() if type(m).__name__ == "ParamWrapper"]
    assert wrappers and all(compat.peft_param_ndim(w) == 3 for w in wrappers)
    assert compat.peft_param_ndim(nn.Linear(2, 2)) == 2

import json
import logging
import math

import pytest
import torch
from conftest import run_without_package
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import hf_moeprune
from hf_moeprune import prune_experts
from hf_moeprune.commands.quantize import main as quantize_main
from hf_moeprune.demo.tiny_models import tiny_model
from hf_moeprune.quantization import (
    SCHEMES,
    QuantizationConfig,
    dequantize,
    get_scheme,
    model_size_bytes,
    quantize,
    quantized_targets,
    select_targets,
    weight_files_size_bytes,
)
from hf_moeprune.quantization.packed_kernels import PackedWeight, packed_kernels
from hf_moeprune.quantization.schemes import absmax_dequantize, absmax_quantize, pack_int4, unpack_int4

IDS = torch.randint(3, 128, (2, 11), generator=torch.Generator().manual_seed(3))


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def _cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def _packed_bytes(scheme: str, numel: int, group_size: int) -> int:
    groups = math.ceil(numel / group_size)
    codes = {"int8": groups * group_size, "int4": groups * group_size // 2, "nf4": math.ceil(numel / 2)}[scheme]
    return codes + groups * 4  # one float32 scale (absmax) per group


def _hetero_keep(model):
    adapter = hf_moeprune.get_adapter(model)
    return {layer: list(range(8 - 2 * (n % 2)))[::-1] for n, layer in enumerate(adapter.moe_layer_indices(model))}


# -- maths on plain tensors ------------------------------------------------------------------------------


def test_int8_absmax_codes_and_scales_are_exact():
    w = torch.tensor([[1.0, -2.0, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0], [4.0, 1.0, -1.0, 2.0]])
    codes, scale = absmax_quantize(w, group_size=4, qmax=127)
    assert codes.dtype == torch.int8 and codes.shape == (3, 4)
    assert torch.equal(scale.flatten(), torch.tensor([2 / 127, 0.0, 4 / 127]))
    assert codes[0].tolist() == [64, -127, 32, 0]  # 63.5 rounds half to even -> 64; 31.75 -> 32
    assert codes[1].tolist() == [0, 0, 0, 0]  # an all-zero group gives zeros, not NaN
    assert codes[2].tolist() == [127, 32, -32, 64]
    back = absmax_dequantize(codes, scale, w.shape, torch.float32)
    assert back.shape == w.shape and torch.all((back - w).abs() <= scale.repeat_interleave(4).view(3, 4) / 2 + 1e-7)


def test_padding_of_the_last_group_is_dropped_on_the_way_back():
    w = torch.arange(1.0, 8.0).reshape(7, 1)  # 7 values, groups of 4 -> one padded group
    codes, scale = absmax_quantize(w, group_size=4, qmax=127)
    assert codes.shape == (2, 4) and codes[1, 3] == 0
    back = absmax_dequantize(codes, scale, w.shape, torch.float64)
    assert back.shape == (7, 1) and back.dtype == torch.float64
    torch.testing.assert_close(back, w.double(), atol=7 / 127 / 2, rtol=0)


def test_int4_pack_unpack_round_trips_every_code():
    codes = torch.arange(-8, 8, dtype=torch.int8).repeat(3, 2)  # [3, 32]
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 16)
    assert torch.equal(unpack_int4(packed), codes)
    assert packed[0, 0].item() == (0 | (1 << 4))  # -8 -> 0 (low nibble), -7 -> 1 (high nibble)


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
@pytest.mark.parametrize("shape", [(8, 96, 32), (768, 32), (7, 5, 3), (4, 64, 128)])
def test_scheme_round_trip_shapes_and_error(scheme, shape):
    torch.manual_seed(0)
    w = torch.randn(shape) * 0.02
    impl = get_scheme(scheme)
    packed = impl.quantize(w, 64)
    back = impl.dequantize(packed, w.shape, w.dtype, 64)
    assert back.shape == w.shape and back.dtype == w.dtype
    rel = ((back - w).norm() / w.norm()).item()
    # Gaussian weights: int8 ~0.006, nf4 ~0.09, int4 ~0.11. A (768, 32) weight through bitsandbytes' CPU
    # dequantize with its real shape gives 0.47 (blocks assumed within rows), which this would catch.
    assert rel < {"int8": 0.01, "nf4": 0.12, "int4": 0.15}[scheme], rel
    assert sum(t.numel() * t.element_size() for t in packed) == _packed_bytes(scheme, w.numel(), 64)
    # the meta skeleton that from_pretrained builds has exactly the packed shapes and dtypes
    on_meta = impl.quantize(w.to("meta"), 64)
    assert [(t.shape, t.dtype) for t in on_meta] == [(t.shape, t.dtype) for t in packed]
    assert all(t.is_meta for t in on_meta)


def test_bf16_weights_keep_their_dtype():
    w = torch.randn(4, 64, 32, dtype=torch.bfloat16)
    for scheme in SCHEMES:
        impl = get_scheme(scheme)
        assert impl.dequantize(impl.quantize(w, 64), w.shape, w.dtype, 64).dtype == torch.bfloat16


# -- config validation -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"scheme": "fp3"}, "unknown quantization scheme 'fp3'; known schemes: \\['int4', 'int8', 'nf4'\\]"),
        ({"scheme": "nf4", "group_size": 48}, "group_size=48 for scheme 'nf4'"),
        ({"scheme": "int4", "group_size": 33}, "group_size=33 for scheme 'int4'"),
        ({"scheme": "int8", "group_size": 0}, "group_size=0"),
        ({"skip_patterns": ["("]}, "skip pattern '\\(' is not a valid regex"),
        ({"skip_patterns": "gate"}, "skip_patterns='gate'"),
        ({"quant_method": "bitsandbytes"}, "quant_method='bitsandbytes'"),
    ],
)
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuantizationConfig(**kwargs)


def test_config_defaults_and_json_round_trip():
    config = QuantizationConfig(scheme="nf4")
    assert config.group_size == 64 and QuantizationConfig().group_size == 128
    again = QuantizationConfig.from_dict(json.loads(config.to_json_string()))
    assert again == config


# -- quantize on every family ----------------------------------------------------------------------------


# Gemma-4's tiny model measures 0.9954; the same model without its MoE block (enable_moe_block=False) already only
# reaches 0.9987 (and 0.9996 cast to bf16), so the floor is set by the architecture at this size, not by the experts.
INT8_MIN_COSINE = {"gemma4_text": 0.993}


def test_quantize_every_family(family):
    model = tiny_model(family)
    adapter = hf_moeprune.get_adapter(model)
    original = {name: p.detach().clone() for name, p in model.named_parameters()}
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    expected = _logits(model)
    fp_bytes = model_size_bytes(model)
    assert fp_bytes == sum(t.numel() * 4 for t in [*original.values(), *buffers.values()])

    quantize(model, "int8")
    quantized = quantized_targets(model)
    layers = adapter.moe_layer_indices(model)
    for layer in layers:
        for tensor in ("gate_up_proj", "down_proj"):
            name = f"model.layers.{layer}.{adapter.experts_path}.{tensor}"
            assert name in quantized and original[name].ndim == 3
            assert getattr(model.get_submodule(name.rpartition(".")[0]), tensor).shape == original[name].shape
    assert any(".self_attn." in name for name in quantized)
    # routers, embeddings, norms, biases (GPT-OSS expert/router biases) stay bit-for-bit as they were
    kept = dict(model.named_parameters())
    for name, value in original.items():
        if name in quantized:
            continue
        assert name in kept and torch.equal(kept[name], value), name
        assert not name.endswith((".experts.gate_up_proj", ".experts.down_proj", "q_proj.weight")), name
    assert any(n.endswith(f".{adapter.router_path}.{adapter.router_tensors[0]}") for n in kept)
    assert "model.embed_tokens.weight" in kept and "lm_head.weight" in kept
    # state-space internals stay in high precision; their projections are quantized (Jamba, Qwen3-Next)
    for name in original:
        if name.endswith(("A_log", "dt_proj.weight", "conv1d.weight")):
            assert name in kept and name not in quantized, name
        if name.endswith(("mamba.in_proj.weight", "linear_attn.in_proj_qkvz.weight")):
            assert name in quantized, name
    for name, value in buffers.items():  # e.g. DeepSeek's e_score_correction_bias
        assert torch.equal(dict(model.named_buffers())[name], value), name

    # the size is exactly: untouched tensors + packed codes + one float32 scale per group of 128
    untouched = sum(v.numel() * 4 for n, v in original.items() if n not in quantized)
    untouched += sum(b.numel() * 4 for b in buffers.values())
    packed = sum(_packed_bytes("int8", original[n].numel(), 128) for n in quantized)
    assert model_size_bytes(model) == untouched + packed < fp_bytes

    out = _logits(model)
    assert out.shape == expected.shape and _cosine(out, expected) > INT8_MIN_COSINE.get(family, 0.999)


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_nf4_forward(family):
    model = tiny_model(family)
    expected = _logits(model)
    quantize(model, "nf4")
    for name in quantized_targets(model):
        module_name, _, tensor = name.rpartition(".")
        codes = model.get_submodule(module_name).parametrizations[tensor].original0
        assert codes.dtype == torch.uint8
    assert _cosine(_logits(model), expected) > 0.95


def test_lm_head_is_quantized_only_on_request_and_never_when_tied(caplog):
    model = tiny_model("mixtral")
    quantize(model, "int8", include_lm_head=True)
    assert "lm_head.weight" in quantized_targets(model)
    assert "model.embed_tokens.weight" not in quantized_targets(model)

    tied = tiny_model("mixtral", tie_word_embeddings=True)
    with caplog.at_level(logging.WARNING, logger="hf_moeprune.quantization.quantizer"):
        quantize(tied, "int8", include_lm_head=True)
    assert "lm_head.weight" not in quantized_targets(tied)
    assert "tied" in caplog.text
    assert tied.lm_head.weight is tied.model.embed_tokens.weight


def test_skip_patterns_and_refusals():
    model = tiny_model("mixtral")
    config = QuantizationConfig(scheme="int8", skip_patterns=[*QuantizationConfig().skip_patterns, r"self_attn\."])
    names = [t.full_name for t in select_targets(model, config)]
    assert names and all(".mlp.experts." in n for n in names)
    with pytest.raises(ValueError, match="nothing to quantize"):
        quantize(tiny_model("mixtral"), "int8", skip_patterns=[r"."])
    with pytest.raises(ValueError, match="either a QuantizationConfig or config fields"):
        quantize(model, config, group_size=64)
    quantize(model, config)
    with pytest.raises(ValueError, match="already quantized"):
        quantize(model, "nf4")


def test_dequantize_gives_plain_parameters_with_the_quantized_values():
    model = quantize(tiny_model("qwen2_moe"), "int4")
    expected = _logits(model)
    dequantize(model)
    assert not quantized_targets(model) and not model.is_quantized
    assert not hasattr(model.config, "quantization_config")
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts.gate_up_proj, torch.nn.Parameter) and type(experts).__name__ == "Qwen2MoeExperts"
    assert not experts._forward_hooks and not experts._forward_pre_hooks
    assert torch.equal(_logits(model), expected)


def test_eager_experts_dequantize_each_tensor_once_per_forward(monkeypatch):
    model = quantize(tiny_model("mixtral"), "int8")
    with packed_kernels(False):
        model.set_experts_implementation("grouped_mm")
        expected = _logits(model)
    model.set_experts_implementation("eager")
    scheme = get_scheme("int8")
    calls = []
    original = type(scheme).dequantize

    def counting(self, packed, shape, dtype, group_size):
        calls.append(tuple(shape))
        return original(self, packed, shape, dtype, group_size)

    monkeypatch.setattr(type(scheme), "dequantize", counting)
    with packed_kernels(False):  # the dequantizing path (CUDA, nf4, training)
        out = _logits(model)
    # without the cache scoped to the experts' forward, eager would dequantize once per routed expert
    assert len(calls) == len(quantized_targets(model))
    assert torch.nn.utils.parametrize._cache_enabled == 0 and not torch.nn.utils.parametrize._cache
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


# -- save / reload ---------------------------------------------------------------------------------------


def _save_and_reload(model, path):
    model.save_pretrained(path)
    return AutoModelForCausalLM.from_pretrained(path)


@pytest.mark.parametrize("family, scheme", [("mixtral", "int8"), ("mixtral", "nf4"), ("gpt_oss", "int4")])
def test_save_reload_is_exact(family, scheme, tmp_path):
    model = tiny_model(family)
    fp_dir = tmp_path / "fp"
    model.save_pretrained(fp_dir)
    quantize(model, scheme)
    expected = _logits(model)
    reloaded = _save_and_reload(model, tmp_path / "q")
    assert type(reloaded) is type(model)
    assert torch.equal(_logits(reloaded), expected)
    assert model_size_bytes(reloaded) == model_size_bytes(model)
    assert set(quantized_targets(reloaded)) == set(quantized_targets(model))

    config = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "hf_moeprune" and config["scheme"] == scheme
    with safe_open(tmp_path / "q" / "model.safetensors", "pt") as f:
        keys = list(f.keys())
        code_keys = [k for k in keys if k.endswith("original0")]
        assert code_keys and all(f.get_slice(k).get_dtype() in ("I8", "U8") for k in code_keys)
        assert not any(k.endswith(("experts.gate_up_proj", "experts.down_proj")) for k in keys)
    assert weight_files_size_bytes(tmp_path / "q") < 0.5 * weight_files_size_bytes(fp_dir)


def test_pruned_heterogeneous_model_save_reload_is_exact(tmp_path):
    model = tiny_model("mixtral")
    prune_experts(model, _hetero_keep(model))
    quantize(model, "nf4")
    expected = _logits(model)
    reloaded = _save_and_reload(model, tmp_path)
    assert hf_moeprune.is_pruned(reloaded) and reloaded.config.experts_per_layer == [8, 6, 8]
    assert [layer.mlp.experts.gate_up_proj.shape[0] for layer in reloaded.model.layers] == [8, 6, 8]
    assert torch.equal(_logits(reloaded), expected)


def test_loaded_then_pruned_then_quantized_model_reloads_exactly(tmp_path):
    tiny_model("mixtral").save_pretrained(tmp_path / "fp")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "fp")
    prune_experts(model, _hetero_keep(model))
    quantize(model, "int8")
    expected = _logits(model)
    assert torch.equal(_logits(_save_and_reload(model, tmp_path / "q")), expected)


def test_pruned_uniform_model_keeps_the_pruned_format_when_quantized(tmp_path):
    # a stock export would carry quant_method hf_moeprune under model_type qwen3_moe, which transformers without
    # hf_moeprune skips (random weights); the pruned format makes it fail loudly instead (next test)
    model = tiny_model("qwen3_moe")
    prune_experts(model, {i: [6, 1, 3, 4] for i in range(3)})
    quantize(model, "int8")
    expected = _logits(model)
    reloaded = _save_and_reload(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "moeprune_qwen3_moe"
    assert hf_moeprune.is_pruned(reloaded) and reloaded.config.experts_per_layer == [4, 4, 4]
    assert torch.equal(_logits(reloaded), expected)


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_hf_moeprune_format_fails_loudly_without_the_package(family, tmp_path):
    model = tiny_model(family)
    quantize(model, "int4")  # a stock (unpruned) model: saved in the pruned format all the same
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == f"moeprune_{family}" and config["quantization_config"]["quant_method"] == (
        "hf_moeprune"
    )
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path)), _logits(model))
    code = (
        "from transformers import AutoModelForCausalLM\n"
        "for remote in (False, True):\n"
        "    try:\n"
        f"        AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}, trust_remote_code=remote)\n"
        "    except Exception as exc:\n"
        "        print(remote, type(exc).__name__, str(exc).replace(chr(10), ' '))\n"
        "    else:\n"
        "        print(remote, 'LOADED')\n"
    )
    result = run_without_package(code)
    assert result.returncode == 0, result.stderr[-2000:]
    plain, remote = result.stdout.strip().splitlines()[-2:]
    assert plain.startswith("False ValueError") and "contains custom code" in plain, plain
    assert remote.startswith("True ImportError") and "quantized in hf_moeprune's packed format" in remote, remote
    assert "--format compressed-tensors" in remote


def test_config_that_does_not_match_the_weights_is_refused(tmp_path):
    quantize(tiny_model("mixtral"), "int8").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"]["include_lm_head"] = True  # the checkpoint holds a plain lm_head.weight
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"no packed data for 1 tensor\(s\).*\['lm_head.weight'\]"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_full_precision_checkpoint_quantized_on_load_matches_quantize(tmp_path):
    model = tiny_model("olmoe")
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=QuantizationConfig(scheme="int8"))
    assert loaded.is_quantized and set(quantized_targets(loaded)) == {
        t.full_name for t in select_targets(model, QuantizationConfig())
    }
    assert torch.equal(_logits(loaded), _logits(quantize(model, "int8")))


def test_left_padded_batch_generation_matches_one_by_one(tmp_path):
    model = _save_and_reload(quantize(tiny_model("mixtral"), "int8"), tmp_path)
    prompts = [IDS[0, :9], IDS[1, :6]]
    batch = torch.zeros(2, 9, dtype=torch.long)
    mask = torch.zeros(2, 9, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        batch[row, 9 - len(prompt) :] = prompt
        mask[row, 9 - len(prompt) :] = 1
    together = model.generate(input_ids=batch, attention_mask=mask, max_new_tokens=5, do_sample=False)
    for row, prompt in enumerate(prompts):
        alone = model.generate(input_ids=prompt[None], max_new_tokens=5, do_sample=False)
        assert together[row, -5:].tolist() == alone[0, -5:].tolist()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("scheme", ["int8", "nf4"])
def test_cuda_forward_matches_cpu(scheme):
    model = quantize(tiny_model("mixtral"), scheme)
    on_cpu = _logits(model)
    model.to("cuda")
    on_gpu = _logits(model, IDS.cuda()).cpu()
    torch.testing.assert_close(on_gpu, on_cpu, rtol=1e-3, atol=1e-3)


# -- CLI -------------------------------------------------------------------------------------------------


def test_cli_quantizes_positionally_and_refuses_bad_input(tmp_path, capsys):
    tiny_model("mixtral").save_pretrained(tmp_path / "fp")
    assert quantize_main([str(tmp_path / "fp"), str(tmp_path / "q"), "--scheme", "nf4", "--include-lm-head"]) == 0
    config = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert config["scheme"] == "nf4" and config["include_lm_head"] is True
    assert "weight files on disk" in capsys.readouterr().out
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert "lm_head.weight" in quantized_targets(reloaded)

    with pytest.raises(SystemExit, match="unknown quantization scheme 'int3'; known schemes"):
        quantize_main([str(tmp_path / "fp"), str(tmp_path / "bad"), "--scheme", "int3"])
    assert not (tmp_path / "bad").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fp", "q"]  # no temporary folder left behind
    before = sorted(p.name for p in (tmp_path / "q").iterdir())
    with pytest.raises(FileExistsError, match="not empty"):
        quantize_main([str(tmp_path / "fp"), str(tmp_path / "q")])
    assert sorted(p.name for p in (tmp_path / "q").iterdir()) == before


# -- packed kernels (CPU inference without dequantizing) ---------------------------------------------------


@pytest.mark.parametrize("family, scheme, group_size, min_cosine", [
    ("mixtral", "int4", 32, 0.9999), ("mixtral", "int8", 128, 0.9995), ("qwen3_moe", "int4", 64, 0.9999),
])  # fmt: skip
def test_packed_kernels_match_the_dequantized_reference(family, scheme, group_size, min_cosine, monkeypatch):
    # widths that fit the kernels' groups (real models: 2048..7168); tiny defaults (32, 48) fall back
    model = tiny_model(family, hidden_size=64, intermediate_size=128, moe_intermediate_size=128, head_dim=16)
    quantize(model, scheme, group_size=group_size)
    with packed_kernels(False):
        reference = _logits(model)
    calls = []
    original = PackedWeight.linear

    def counting(self, x, bias):
        calls.append((self.parametrization.shape, self.expert, x.shape[0]))
        return original(self, x, bias)

    monkeypatch.setattr(PackedWeight, "linear", counting)
    out = _logits(model)
    assert _cosine(out, reference) > min_cosine
    # bf16 activations (and, for int8, the per-channel copy): a small relative error, nothing systematic
    assert (out - reference).norm() < (0.02 if scheme == "int4" else 0.04) * reference.norm()
    experts_calls = [c for c in calls if c[1] is not None]
    attention_calls = [c for c in calls if c[1] is None]
    assert experts_calls and attention_calls  # both expert and attention matmuls ran on the kernels
    # only experts that received tokens: one token, top-2 -> 2 experts x 2 matmuls per MoE layer
    calls.clear()
    _logits(model, IDS[:1, :1])
    layers = len(hf_moeprune.get_adapter(model).moe_layer_indices(model))
    assert len([c for c in calls if c[1] is not None]) == 2 * 2 * layers
    # the kernel copies are kept per used expert only, outside the state dict
    assert not any("kernel" in k for k in model.state_dict())
    # with grad enabled (training, distillation through the model) the differentiable path is used
    with torch.enable_grad():
        calls.clear()
        model(IDS).logits.sum()
        assert not calls


def test_packed_kernels_fall_back_for_other_uses():
    model = tiny_model("gpt_oss", hidden_size=64, intermediate_size=128, head_dim=16)
    quantize(model, "int4", group_size=32)  # GPT-OSS computes x @ W[e] on [in, out] experts: dequantized per expert
    with packed_kernels(False):
        reference = _logits(model)
    assert _cosine(_logits(model), reference) > 0.9999
    with torch.no_grad():
        weight = model.model.layers[0].mlp.experts.gate_up_proj
        assert isinstance(weight, PackedWeight) and weight.shape == (8, 64, 256)
        assert torch.equal(weight[3].dequantize(), model.model.layers[0].mlp.experts.parametrizations.gate_up_proj[0]
                           .dequantize_packed(weight.packed)[3])  # fmt: skip

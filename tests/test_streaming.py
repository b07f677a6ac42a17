"""Streaming surgery writes the same files as loading, pruning and saving the whole model."""

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from hf_moeprune import get_adapter, prune_experts
from hf_moeprune.commands import main
from hf_moeprune.demo.tiny_models import tiny_model
from hf_moeprune.streaming import CheckpointReader, StreamingUnsupported, parse_size, prune_checkpoint


def _tensors(folder: Path) -> dict[str, tuple[torch.dtype, tuple, bytes]]:
    out = {}
    for file in folder.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                t = f.get_tensor(key)
                out[key] = (t.dtype, tuple(t.shape), t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return out


def _plans(model, uniform: bool) -> dict[int, list[int]]:
    layers = get_adapter(model).moe_layer_indices(model)
    if uniform:
        return {layer: [7, 0, 2, 5] for layer in layers}  # a reordering too: kept ids in the plan's order
    return {layer: ([0, 2, 5, 7] if i == 0 else [6, 1, 3, 4, 5, 0]) for i, layer in enumerate(layers)}


def _in_memory(src: Path, plan, out: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(src)
    prune_experts(model, plan)
    model.save_pretrained(out)


# mixtral/qwen2_moe: legacy per-expert keys on disk; deepseek_v3: dense first layer and a correction-bias buffer;
# gpt_oss: fused tensors with biases on disk; longcat_flash / inkling_text: router rows after the routed experts
# (zero-computation / shared experts), kept at the end; llama4_text: transposed fused experts, an nn.Linear router
@pytest.mark.parametrize(
    "family", ["mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss", "longcat_flash", "inkling_text", "llama4_text"]
)
@pytest.mark.parametrize("uniform", [True, False], ids=["stock-export", "pruned-format"])
def test_streaming_surgery_writes_the_in_memory_files(tmp_path, family, uniform):
    model = tiny_model(family).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "src", max_shard_size="60KB")
    assert len(CheckpointReader.open(tmp_path / "src").weight_map) > 0
    assert (tmp_path / "src" / "model.safetensors.index.json").exists(), "the source must be multi-shard"
    plan = _plans(model, uniform)
    _in_memory(tmp_path / "src", plan, tmp_path / "memory")
    skeleton = prune_checkpoint(tmp_path / "src", plan, tmp_path / "stream", max_shard_size="40KB")

    expected, streamed = _tensors(tmp_path / "memory"), _tensors(tmp_path / "stream")
    assert streamed.keys() == expected.keys()
    for key in expected:
        assert streamed[key] == expected[key], f"{key} differs"
    configs = [json.loads((tmp_path / d / "config.json").read_text()) for d in ("memory", "stream")]
    assert configs[0] == configs[1]
    assert ("moeprune_provenance" in configs[0]) == uniform
    assert all(skeleton.config.kept_expert_ids[layer] == kept for layer, kept in plan.items())
    index = json.loads((tmp_path / "stream" / "model.safetensors.index.json").read_text())
    shards = {f.name for f in (tmp_path / "stream").glob("*.safetensors")}
    assert len(shards) > 1 and set(index["weight_map"].values()) == shards
    assert index["metadata"]["total_size"] == sum(len(v[2]) for v in streamed.values())
    assert not [p for p in (tmp_path / "stream").iterdir() if p.name.startswith(".")], "no temporary files left"
    if not uniform:
        assert (tmp_path / "stream" / "modeling_moeprune.py").read_text() == (
            tmp_path / "memory" / "modeling_moeprune.py"
        ).read_text()
    # the streamed checkpoint loads and computes what the in-memory one computes
    ids = torch.randint(3, min(128, model.config.vocab_size), (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(tmp_path / "memory")(ids).logits
        b = AutoModelForCausalLM.from_pretrained(tmp_path / "stream")(ids).logits
    assert torch.equal(a, b)


def test_streaming_a_pruned_format_checkpoint_again(tmp_path):
    """Fused expert tensors on disk (the hf_moeprune format) are sliced along the expert dimension."""
    model = tiny_model("qwen3_moe")
    prune_experts(model, {0: [0, 1, 2, 3, 4, 5], 1: [0, 2, 4, 6], 2: [1, 2, 3, 4, 5, 6, 7]})
    model.save_pretrained(tmp_path / "src")
    with safe_open(tmp_path / "src" / "model.safetensors", "pt") as f:
        assert "model.layers.0.mlp.experts.gate_up_proj" in f.keys()  # noqa: SIM118
    plan = {0: [5, 0, 1], 2: [6, 0, 3]}
    _in_memory(tmp_path / "src", plan, tmp_path / "memory")
    prune_checkpoint(tmp_path / "src", plan, tmp_path / "stream")
    assert _tensors(tmp_path / "stream") == _tensors(tmp_path / "memory")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "stream").config
    assert reloaded.kept_expert_ids == [[5, 0, 1], [0, 2, 4, 6], [7, 1, 4]]


def test_streaming_refuses_a_bad_plan_before_writing(tmp_path):
    tiny_model("mixtral").save_pretrained(tmp_path / "src")
    with pytest.raises(ValueError, match=r"layer 1: expert indices \[8\] out of range"):
        prune_checkpoint(tmp_path / "src", {1: [0, 8]}, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(StreamingUnsupported, match="not a local folder"):
        prune_checkpoint(tmp_path / "nowhere", {1: [0, 1]}, tmp_path / "out")
    with pytest.raises(ValueError, match="'5 parsecs'"):
        parse_size("5 parsecs")


def test_prune_cli_streams_a_plan_file(tmp_path, caplog):
    tiny_model("mixtral").save_pretrained(tmp_path / "src", max_shard_size="60KB")
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"0": [0, 1, 2], "2": [4, 5]}))
    with caplog.at_level(logging.INFO, logger="hf_moeprune"):
        assert main(["prune", str(tmp_path / "src"), "--output_dir", str(tmp_path / "s"), "--plan", str(plan),
                     "--max_shard_size", "50KB"]) == 0  # fmt: skip
    assert "by streaming" in caplog.text
    assert main(["prune", str(tmp_path / "src"), "--output_dir", str(tmp_path / "m"), "--plan", str(plan),
                 "--streaming", "false"]) == 0  # fmt: skip
    assert _tensors(tmp_path / "s") == _tensors(tmp_path / "m")
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "s").config.experts_per_layer == [3, 8, 2]
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(SystemExit, match="must be a non-empty JSON object of layer -> expert indices"):
        main(["prune", str(tmp_path / "src"), "--output_dir", str(tmp_path / "x"), "--plan", str(bad)])
    assert not (tmp_path / "x").exists()


def test_prune_cli_one_shot_layerwise_merge_and_saved_statistics(workspace, tmp_path):
    """`prune --data --merge` calibrates layer by layer and streams the merged result: the same bytes as the
    in-memory path; `--stats_out` then `--stats_in` reproduce the plan without a second calibration pass."""
    model, data = str(workspace / "model"), str(workspace / "data.jsonl")
    common = ["--text_field", "body", "--block_size", "32", "--max_blocks", "8", "--target", "0.5", "--merge", "true"]
    assert main(["prune", model, "--output_dir", str(tmp_path / "s"), "--data", data, *common,
                 "--stats_out", str(tmp_path / "stats")]) == 0  # fmt: skip
    assert main(["prune", model, "--output_dir", str(tmp_path / "m"), "--data", data, *common,
                 "--layerwise", "false", "--streaming", "false"]) == 0  # fmt: skip
    assert _tensors(tmp_path / "s") == _tensors(tmp_path / "m")
    merged = _tensors(tmp_path / "s")
    assert main(["prune", model, "--output_dir", str(tmp_path / "r"), "--stats_in", str(tmp_path / "stats"),
                 "--target", "0.5", "--merge", "true"]) == 0  # fmt: skip
    assert _tensors(tmp_path / "r") == merged
    assert main(["prune", model, "--output_dir", str(tmp_path / "plain"), "--stats_in", str(tmp_path / "stats"),
                 "--target", "0.5"]) == 0  # fmt: skip
    plain = _tensors(tmp_path / "plain")
    assert plain.keys() == merged.keys()
    assert any(plain[k] != merged[k] for k in plain if ".experts." in k), "merging changed kept experts"
    assert all(plain[k] == merged[k] for k in plain if ".experts." not in k)
    config = json.loads((tmp_path / "s" / "config.json").read_text())
    calibration = config["moeprune_calibration"]
    assert calibration["samples"] == 8 and calibration["block_size"] == 32 and calibration["merge"] is True
    assert (tmp_path / "s" / "tokenizer.json").exists()


def test_prune_cli_chat_samples_unpacked(workspace, tmp_path):
    """Chat-formatted JSONL goes through the tokenizer's chat template, one padded sample per conversation."""
    import shutil

    from transformers import AutoTokenizer

    from hf_moeprune.commands.prune import PruneCLIArguments, _calibration_batches

    model = tmp_path / "chat-model"
    shutil.copytree(workspace / "model", model)
    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.chat_template = "{% for m in messages %}<s> {{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
    tokenizer.save_pretrained(model)
    rows = [{"messages": [{"role": "user", "content": "def loads ( s ) :"}, {"role": "assistant", "content": "return"
             " " * i + "None"}]} for i in range(5)] + [{"messages": [{"role": "user", "content": "import json " * 40}]}]  # fmt: skip
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    args = PruneCLIArguments(str(model), str(tmp_path / "o"), data=str(data), calibration="samples", max_length=24,
                             batch_size=4)  # fmt: skip
    batches, info = _calibration_batches(args, AutoTokenizer.from_pretrained(model))
    assert info["chat_template"] is True and info["samples"] == 6 and info["longest_sample"] == 24
    assert [b["input_ids"].shape[0] for b in batches] == [4, 2]
    first = AutoTokenizer.from_pretrained(model).decode(batches[0]["input_ids"][0][batches[0]["attention_mask"][0] > 0])
    assert first.startswith("<s> <unk> : def loads ( s ) : </s> <s>")  # role names are not in the toy vocabulary
    assert info["tokens"] == sum(int(b["attention_mask"].sum()) for b in batches) < 6 * 24
    assert main(["prune", str(model), "--output_dir", str(tmp_path / "o"), "--data", str(data), "--calibration",
                 "samples", "--max_length", "24", "--target", "0.25"]) == 0  # fmt: skip
    calibration = json.loads((tmp_path / "o" / "config.json").read_text())["moeprune_calibration"]
    assert calibration["samples"] == 6 and calibration["max_length"] == 24 and calibration["chat_template"] is True
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "x"}]}\n{"prompt": "y"}\n')
    with pytest.raises(SystemExit, match=r"bad.jsonl:2: row has neither 'messages' nor 'text'"):
        main(["prune", str(model), "--output_dir", str(tmp_path / "x"), "--data", str(bad), "--calibration", "samples"])
    assert not (tmp_path / "x").exists()


def test_reader_reads_every_dtype_like_safetensors(tmp_path):
    """CheckpointReader.read fills tensors with plain file reads (no memory map); every dtype, a 0-d and an empty
    tensor come back bit-identical to safetensors' own reader, and a header whose byte count does not fit the
    shape is refused naming the file and tensor."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    tensors = {
        "bf16": torch.randn(3, 5, generator=g).to(torch.bfloat16),
        "f32": torch.randn(7, generator=g),
        "f16": torch.randn(2, 2, 2, generator=g).half(),
        "f8": torch.randn(4, 4, generator=g).to(torch.float8_e4m3fn),
        "i64": torch.arange(-3, 9),
        "u8": torch.arange(0, 250, 7, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.25),
        "empty": torch.zeros(0, 4),
    }
    save_file(tensors, tmp_path / "model.safetensors")
    read = CheckpointReader.open(tmp_path).read(list(tensors))
    assert read.keys() == tensors.keys()
    for name, expected in tensors.items():
        assert read[name].dtype == expected.dtype and read[name].shape == expected.shape, name
        assert torch.equal(read[name].view(-1).view(torch.uint8), expected.view(-1).view(torch.uint8)), name

    raw = (tmp_path / "model.safetensors").read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + size])
    header["f32"]["shape"] = [8]  # 28 bytes of data for 32 bytes of shape
    text = json.dumps(header).encode()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "model.safetensors").write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + size :])
    with pytest.raises(ValueError, match="tensor 'f32': 28 bytes of data for shape"):
        CheckpointReader(tmp_path / "bad", {"f32": "model.safetensors"}).read(["f32"])


def test_load_conversions_take_the_sources_over(tmp_path):
    """A fused group's per-expert sources leave the caller's dict (the converters free them as they merge), and the
    fused tensor equals the stacked sources."""
    from hf_moeprune import compat
    from hf_moeprune.streaming import meta_skeleton

    model = tiny_model("mixtral").to(torch.bfloat16)
    model.save_pretrained(tmp_path / "src")
    skeleton = meta_skeleton(tmp_path / "src")
    reader = CheckpointReader.open(tmp_path / "src")
    keys = sorted(k for k in reader.weight_map if k.startswith("model.layers.0.") and ".experts." in k)
    sources = reader.read(keys)
    w1 = [sources[f"model.layers.0.block_sparse_moe.experts.{e}.w1.weight"].clone() for e in range(8)]
    w3 = [sources[f"model.layers.0.block_sparse_moe.experts.{e}.w3.weight"].clone() for e in range(8)]
    out = compat.apply_load_conversions(skeleton, compat.load_conversions(skeleton), skeleton.state_dict(), sources)
    assert sources == {}
    assert torch.equal(out["model.layers.0.mlp.experts.gate_up_proj"], torch.cat([torch.stack(w1), torch.stack(w3)], 1))
    assert torch.equal(out["model.layers.0.mlp.experts.gate_up_proj"], model.model.layers[0].mlp.experts.gate_up_proj)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3"])
@pytest.mark.parametrize("cast", [False, True], ids=["same-dtype", "f32-on-disk-to-bf16"])
def test_stacked_groups_fill_slots_like_the_whole_conversion(tmp_path, family, cast):
    """Legacy per-expert keys are read one by one into their slot of the fused tensor; the layer equals what
    transformers' conversion of all sources at once gives (bit for bit, also when the load casts)."""
    from transformers import AutoConfig

    from hf_moeprune import compat
    from hf_moeprune.streaming import ModuleLoader, meta_skeleton

    model = tiny_model(family).to(torch.float32 if cast else torch.bfloat16)
    model.save_pretrained(tmp_path / "src", max_shard_size="60KB")
    config = AutoConfig.from_pretrained(tmp_path / "src")
    config.dtype = "bfloat16"
    skeleton = meta_skeleton(tmp_path / "src", config)
    loader = ModuleLoader.create(tmp_path / "src", skeleton)
    layer = get_adapter(skeleton).moe_layer_indices(skeleton)[0]
    fast = loader.load_module_state(layer)
    assert loader.stacked_groups == 2  # gate_up_proj and down_proj
    whole = compat.apply_load_conversions(
        skeleton, loader.conversions, loader.meta_state, loader.reader.read(loader.units[layer])
    )
    assert fast.keys() == whole.keys()
    for name in whole:
        assert fast[name].dtype == whole[name].dtype, name
        assert torch.equal(fast[name], whole[name]), name
    assert {fast[n].dtype for n in fast if ".experts." in n} == {torch.bfloat16}
    # with rows selected (a reordering too): only those experts' keys are read, in the plan's order
    keep = torch.tensor([5, 0, 3])
    experts = [n for n in whole if ".experts." in n]
    selected = {}
    for group in loader.groups(layer, dict.fromkeys(experts, keep)):
        selected.update(group)
    assert loader.stacked_groups == 4
    for name in whole:
        expected = whole[name].index_select(0, keep) if name in experts else whole[name]
        assert torch.equal(selected[name], expected), name


def test_return_freed_memory_is_safe_to_call_repeatedly():
    from hf_moeprune import streaming

    streaming.return_freed_memory()
    streaming.return_freed_memory()
    import sys

    if sys.platform.startswith("linux") and "glibc" in " ".join(__import__("platform").libc_ver()):
        assert streaming._LIBC is not None  # glibc: the mmap threshold was pinned

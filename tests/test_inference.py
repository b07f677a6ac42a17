import importlib
import inspect
import json
import logging
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

import hf_moeprune
from hf_moeprune import prune_experts
from hf_moeprune.commands.generate import main as generate_main
from hf_moeprune.demo.tiny_models import tiny_model
from hf_moeprune.inference import (
    BatchGenerator,
    GenerationOptions,
    OrderedWriter,
    Prompt,
    completed_ids,
    finish_completion,
    generate,
    generate_file,
    jsonl_appender,
    parse_prompt_lines,
    plan_batches,
    read_prompts,
)

VOCAB = 384
PROMPTS = [
    "Return a new list",
    "Split the string at the last occurrence of sep, and return a 3-tuple containing the part before",
    "Open file",
    "Create a new dictionary with keys from iterable and values set to value.",
    "If the object is a class",
    "Return the canonical string representation of the object. For many object types, including most builtins",
    "Deserialize s",
    "Make an iterator that returns accumulated sums",
    "Join two or more pathname components, inserting the separator as needed",
]


def _stdlib_lines():
    lines = []
    for name in ("json", "collections", "itertools", "functools", "textwrap", "string", "pathlib"):
        for _, obj in inspect.getmembers(importlib.import_module(name)):
            doc = inspect.getdoc(obj)
            if doc:
                lines.extend(line for line in doc.splitlines() if line.strip())
    return lines


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<pad>", "<s>", "</s>", "<unk>"],  # ids 0, 1, 2 match tiny_model's pad/bos/eos
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_stdlib_lines(), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


@pytest.fixture(scope="module")
def tokenizer():
    return _tokenizer()


@pytest.fixture(scope="module")
def pruned_dir(tmp_path_factory, tokenizer):
    """A non-uniformly pruned tiny Mixtral saved in the pruned format, with its tokenizer."""
    model = tiny_model("mixtral", vocab_size=VOCAB, max_position_embeddings=256)
    prune_experts(model, {0: [7, 1, 4, 2, 0], 1: [3, 5], 2: [0, 1, 2, 3, 4, 5, 6]})
    path = tmp_path_factory.mktemp("pruned")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def pruned(pruned_dir):
    model = AutoModelForCausalLM.from_pretrained(pruned_dir)
    assert hf_moeprune.is_pruned(model) and model.config.experts_per_layer == [5, 2, 7]
    return model, AutoTokenizer.from_pretrained(pruned_dir)


def _one_at_a_time(model, tokenizer, prompts, max_new_tokens):
    out = []
    for text in prompts:
        ids = tokenizer(text, return_tensors="pt").input_ids
        with torch.no_grad():
            seq = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
        out.append(seq[0, ids.shape[1] :].tolist())
    return out


# ------------------------------------------------------------------------------------------------ pure parts


def test_parse_prompt_lines_reports_each_bad_line():
    lines = [
        '{"id": 1, "prompt": "a"}',
        "{not json",
        '{"id": 2}',
        "",
        '{"id": 3, "prompt": "   "}',
        '["id", "prompt"]',
        '{"id": 1, "prompt": "again"}',
        '{"id": [1], "prompt": "x"}',
        '{"id": "b", "prompt": "ok"}',
        '{"id": "1", "prompt": "string id differs from int id"}',
    ]
    prompts, bad = parse_prompt_lines(lines)
    assert [(p.id, p.line) for p in prompts] == [(1, 1), ("b", 9), ("1", 10)]
    assert [b.line for b in bad] == [2, 3, 5, 6, 7, 8]
    reasons = {b.line: b.reason for b in bad}
    assert "not valid JSON" in reasons[2]
    assert "missing field(s) ['prompt']" in reasons[3]
    assert reasons[5] == "empty prompt"
    assert "duplicate id 1 (first on line 1)" in reasons[7]


def test_finish_completion_rules():
    def decode(ids):
        return "".join(chr(96 + i) for i in ids if i != 0)

    eos = {0}
    # a=1 b=2 c=3 ...
    assert finish_completion([1, 2, 3], eos, decode, []) == ("abc", [1, 2, 3], "length")
    assert finish_completion([1, 2, 0, 3], eos, decode, []) == ("ab", [1, 2, 0], "eos")
    # stop string "bc" completes at the 3rd token; text is cut before it
    assert finish_completion([1, 2, 3, 4, 5], eos, decode, ["bc"]) == ("a", [1, 2, 3], "stop")
    # the earliest of several stop strings wins
    assert finish_completion([1, 2, 3, 4, 5], eos, decode, ["de", "c"]) == ("ab", [1, 2, 3], "stop")
    # a stop string before EOS wins; after EOS it does not count
    assert finish_completion([1, 2, 0, 3], eos, decode, ["b"]) == ("a", [1, 2], "stop")
    assert finish_completion([1, 0, 2, 3], eos, decode, ["bc"]) == ("a", [1, 0], "eos")


def test_plan_batches_sorts_within_windows_and_covers_everything():
    lengths = [5, 1, 9, 3, 7, 2, 8, 4]
    batches = plan_batches(lengths, batch_size=2, window=4)
    assert sorted(i for b in batches for i in b) == list(range(8))
    # window [0..3] by length: 1(1) 3(3) 0(5) 2(9) -> [1, 3], [0, 2]; the batch holding index 0 runs first
    assert batches == [[0, 2], [1, 3], [4, 6], [5, 7]]


def test_ordered_writer_holds_later_results():
    written = []
    writer = OrderedWriter(written.append, total=4)
    writer.add(2, {"i": 2})
    writer.add(1, {"i": 1})
    assert written == [] and writer.held == 2
    writer.add(0, {"i": 0})
    assert written == [{"i": 0}, {"i": 1}, {"i": 2}] and writer.held == 0
    with pytest.raises(ValueError, match="index 1"):
        writer.add(1, {"i": 1})
    writer.add(3, {"i": 3})
    assert [w["i"] for w in written] == [0, 1, 2, 3]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"engine": "vllm"}, "engine='vllm'.*'padded'"),
        ({"batch_size": 0}, "batch_size=0"),
        ({"experts_implementation": "fast"}, "experts_implementation='fast'"),
        ({"stop": [""]}, "stop strings"),
        ({"top_p": 0.0}, "top_p=0.0"),
    ],
)
def test_options_validation_names_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GenerationOptions(**kwargs)


def test_completed_ids_drops_partial_last_line_and_refuses_foreign_files(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": 1, "completion": "x"}\n{"id": "a", "completion": "y"}\n{"id": 7, "compl')
    assert completed_ids(out) == {"1", '"a"'}
    assert out.read_text().endswith('"y"}\n')
    out.write_text('{"id": 1}\nnot ours\n{"id": 2}\n')
    with pytest.raises(ValueError, match="line 2"):
        completed_ids(out)


# ------------------------------------------------------------------------------------------------ with a model


@pytest.fixture(scope="module")
def reference(pruned):
    """Greedy tokens of each prompt generated alone (no padding, no batching)."""
    model, tokenizer = pruned
    return _one_at_a_time(model, tokenizer, PROMPTS, max_new_tokens=10)


@pytest.mark.parametrize("engine", ["padded", "continuous"])
def test_batched_greedy_matches_one_at_a_time_on_pruned_model(pruned, reference, engine):
    model, tokenizer = pruned
    options = GenerationOptions(max_new_tokens=10, batch_size=4, engine=engine, sort_window=8)
    completions = generate(model, tokenizer, PROMPTS, options)
    assert [c.id for c in completions] == list(range(len(PROMPTS)))
    assert [c.token_ids for c in completions] == reference
    assert all(c.finish_reason == "length" and c.tokens == 10 for c in completions)
    assert [c.completion for c in completions] == [tokenizer.decode(r, skip_special_tokens=True) for r in reference]


def test_quantized_pruned_model_batches_token_exactly(pruned_dir, tmp_path):
    quantization = pytest.importorskip("hf_moeprune.quantization")
    model = AutoModelForCausalLM.from_pretrained(pruned_dir)
    quantization.quantize(model, "int8")
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert quantization.quantized_targets(reloaded) and reloaded.config.experts_per_layer == [5, 2, 7]
    tokenizer = AutoTokenizer.from_pretrained(pruned_dir)
    expected = _one_at_a_time(reloaded, tokenizer, PROMPTS[:6], max_new_tokens=6)
    completions = generate(reloaded, tokenizer, PROMPTS[:6], max_new_tokens=6, batch_size=6)
    assert [c.token_ids for c in completions] == expected


def test_uniform_stock_export_generates_the_same_tokens(tmp_path, tokenizer):
    model = tiny_model("mixtral", vocab_size=VOCAB, max_position_embeddings=256)
    prune_experts(model, {layer: [6, 2, 5, 0] for layer in range(3)})
    before = generate(model, tokenizer, PROMPTS[:4], max_new_tokens=6, batch_size=4)
    model.save_pretrained(tmp_path, export_stock=True)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(reloaded).__name__ == "MixtralForCausalLM" and reloaded.config.num_local_experts == 4
    after = generate(reloaded, tokenizer, PROMPTS[:4], max_new_tokens=6, batch_size=4)
    assert [c.token_ids for c in after] == [c.token_ids for c in before]


def test_eos_and_stop_strings_end_completions(pruned):
    model, tokenizer = pruned
    full = generate(model, tokenizer, PROMPTS[:3], max_new_tokens=10, batch_size=3)
    # make the 4th generated token of prompt 0 the EOS token: it must end there, in a batch with others
    eos = full[0].token_ids[3]
    first = full[0].token_ids.index(eos)
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = eos
    try:
        ended = generate(model, tokenizer, PROMPTS[:3], max_new_tokens=10, batch_size=3)
    finally:
        model.generation_config.eos_token_id = saved
    assert ended[0].finish_reason == "eos"
    assert ended[0].token_ids == full[0].token_ids[: first + 1] and ended[0].tokens == first + 1
    assert ended[0].completion == tokenizer.decode(full[0].token_ids[:first], skip_special_tokens=True)

    text = full[1].completion
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip(), text
    stopped = generate(model, tokenizer, PROMPTS[:3], max_new_tokens=10, batch_size=3, stop=[stop])
    assert stopped[1].finish_reason == "stop"
    assert stopped[1].completion == text[: text.index(stop)]
    assert stop in tokenizer.decode(stopped[1].token_ids) and stop not in tokenizer.decode(stopped[1].token_ids[:-1])


def test_sampling_is_reproducible_by_seed(pruned):
    model, tokenizer = pruned
    options = dict(max_new_tokens=8, batch_size=4, do_sample=True, temperature=1.5)
    a = generate(model, tokenizer, PROMPTS, seed=3, **options)
    b = generate(model, tokenizer, PROMPTS, seed=3, **options)
    c = generate(model, tokenizer, PROMPTS, seed=4, **options)
    assert [x.token_ids for x in a] == [x.token_ids for x in b]
    assert [x.token_ids for x in a] != [x.token_ids for x in c]


def _write_prompts(path, bad=True):
    lines = [json.dumps({"id": f"q{i}", "prompt": p}) for i, p in enumerate(PROMPTS)]
    if bad:
        lines.insert(2, '{"id": "broken", "prompt": ')
        lines.insert(5, json.dumps({"id": "empty", "prompt": ""}))
        lines.insert(7, json.dumps({"prompt": "no id"}))
    path.write_text("\n".join(lines) + "\n")


def test_cli_writes_every_prompt_in_order_and_reports_bad_lines(
    pruned_dir, pruned, reference, tmp_path, caplog, capsys
):
    prompts, out = tmp_path / "prompts.jsonl", tmp_path / "out.jsonl"
    _write_prompts(prompts)
    argv = [str(pruned_dir), "--prompts", str(prompts), "--out", str(out), "--batch-size", "4"]
    argv += ["--max-new-tokens", "5", "--progress", "false"]
    with caplog.at_level(logging.WARNING, logger="hf_moeprune.inference"):
        assert generate_main(argv) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in records] == [f"q{i}" for i in range(len(PROMPTS))]
    assert all(set(r) == {"id", "prompt", "completion", "tokens", "finish_reason"} for r in records)
    assert [r["prompt"] for r in records] == PROMPTS
    tokenizer = pruned[1]
    # greedy: the first 5 tokens of the 10-token reference are the 5-token completion
    expected = [tokenizer.decode(r[:5], skip_special_tokens=True) for r in reference]
    assert [r["completion"] for r in records] == expected
    warnings = [r.getMessage() for r in caplog.records]
    assert any(":3: skipped: not valid JSON" in w for w in warnings)
    assert any(":6: skipped: empty prompt" in w for w in warnings)
    assert any(":8: skipped: missing field(s) ['id']" in w for w in warnings)
    assert any("skipped 3 malformed line(s) (lines 3, 6, 8)" in w for w in warnings)
    summary = capsys.readouterr().out
    assert "generated tokens/s" in summary and "peak memory (cpu_peak_rss)" in summary
    assert re.search(rf"^generated tokens +{5 * len(PROMPTS)}$", summary, re.M), summary
    assert re.search(r"^finish reasons +length 9$", summary, re.M), summary

    # an existing --out is never overwritten by accident
    with pytest.raises(SystemExit, match="--resume"):
        generate_main(argv)
    assert len(out.read_text().splitlines()) == len(PROMPTS)


def test_resume_after_interruption_completes_the_file_in_order(pruned, tmp_path):
    model, tokenizer = pruned
    prompts, out, reference = tmp_path / "p.jsonl", tmp_path / "out.jsonl", tmp_path / "ref.jsonl"
    _write_prompts(prompts, bad=False)
    options = GenerationOptions(max_new_tokens=4, batch_size=2, sort_window=4)
    generate_file(model, tokenizer, prompts, reference, options, progress=False)

    class Interrupt(Exception):
        pass

    # the same plumbing as generate_file, interrupted when the 4th prompt finishes
    todo, _ = read_prompts(prompts)
    finished = []
    with pytest.raises(Interrupt), jsonl_appender(out) as write:
        writer = OrderedWriter(write, len(todo))

        def on_result(i, completion):
            writer.add(i, completion.to_record())
            finished.append(i)
            if len(finished) == 4:
                raise Interrupt

        BatchGenerator(model, tokenizer, options).run(todo, on_result=on_result, progress=False)
    # what was written is already on disk, and is an in-order prefix of the full result
    partial = out.read_text().splitlines()
    assert 1 <= len(partial) < len(PROMPTS)
    assert partial == reference.read_text().splitlines()[: len(partial)]
    with out.open("a") as f:
        f.write('{"id": "q8", "prom')  # a line cut short by the interruption

    stats = generate_file(model, tokenizer, prompts, out, options, resume=True, progress=False)
    assert stats.skipped_already_done == len(partial) and stats.prompts == len(PROMPTS) - len(partial)
    assert out.read_text() == reference.read_text()


def test_prompt_objects_keep_their_ids(pruned):
    model, tokenizer = pruned
    prompts = [Prompt("x", PROMPTS[0]), Prompt(42, PROMPTS[1])]
    completions, stats = BatchGenerator(model, tokenizer, GenerationOptions(max_new_tokens=3)).run(
        prompts, progress=False
    )
    assert [c.id for c in completions] == ["x", 42]
    assert stats.generated_tokens == 6 and stats.prompts == 2 and stats.peak_memory_bytes > 0
    assert stats.experts_implementation == "grouped_mm" and stats.engine == "padded"


@pytest.mark.parametrize("engine", ["padded", "continuous"])
def test_models_saved_with_router_logits_on_still_batch(tokenizer, engine):
    """Configs saved from training often say output_router_logits=True; the stock aux loss then fails during a
    padded KV-cache decode. Generation switches router logits off (and back on afterwards)."""
    model = tiny_model("mixtral", vocab_size=VOCAB, max_position_embeddings=256, output_router_logits=True)
    expected = _one_at_a_time(model, tokenizer, PROMPTS[:4], max_new_tokens=5) if engine == "padded" else None
    completions = generate(model, tokenizer, PROMPTS[:4], max_new_tokens=5, batch_size=4, engine=engine)
    assert all(c.tokens == 5 for c in completions)
    if expected is not None:
        assert [c.token_ids for c in completions] == expected
    assert model.config.output_router_logits is True

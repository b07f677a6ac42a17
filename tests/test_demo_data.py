"""The demo's built-in data: stdlib corpus, tokenizer, base-model build and the specialisation maths."""

import ast
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import transformers
from datasets import DatasetDict
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_moeprune.data import pack_token_ids, tokenize_and_pack
from hf_moeprune.demo import base_model as bm
from hf_moeprune.demo import corpus as cm
from hf_moeprune.demo.base_model import (
    BaseModelConfig,
    TokenizerConfig,
    expert_histogram,
    jensen_shannon,
    load_or_train_base_model,
    load_or_train_tokenizer,
    normalized_entropy,
    unigram_cross_entropy,
)
from hf_moeprune.demo.corpus import CorpusConfig, build_corpus, list_source_files, select_rows, split_source

SMALL = CorpusConfig(max_files=40)
TINY_TOKENIZER = TokenizerConfig(vocab_size=400)
TINY_RECIPE = BaseModelConfig(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=32,
    num_local_experts=4,
    block_size=32,
    max_steps=3,
    per_device_train_batch_size=4,
    warmup_steps=0,
    eval_blocks=2,
    num_threads=1,
)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("hf_moeprune_cache")


@pytest.fixture(scope="module")
def small_corpus(cache):
    return build_corpus(cache_dir=cache, config=SMALL)


def _all_docstrings(tree):
    owners = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    return [d for n in ast.walk(tree) if isinstance(n, owners) and (d := ast.get_docstring(n)) is not None]


# -- extraction --------------------------------------------------------------------------------------------


def test_split_source_moves_docstrings_out_of_code():
    source = (
        '"""Module doc."""\n'
        "import os\n\n"
        "class A:\n"
        "    '''Class doc\n\n    spans lines.'''\n\n"
        "    def f(self):\n"
        '        """Only a docstring."""\n\n'
        "    async def g(self):  # comment\n"
        '        "g doc"  # trailing comment\n'
        "        return 1\n\n"
        'def h(): "same line"\n'
    )
    code, docs = split_source(source)
    assert docs == ["Module doc.", "Class doc\n\nspans lines.", "Only a docstring.", "g doc", "same line"]
    tree = ast.parse(code)  # still valid Python
    # the one docstring sharing its line with `def` stays; every other one is gone
    assert _all_docstrings(tree) == ["same line"]
    assert "        ...\n" in code and "return 1" in code and "import os" in code


def test_split_source_counts_utf8_offsets():
    code, docs = split_source('x = "é"\ndef f():\n    """Café docstring."""\n    return "ü"\n')
    assert docs == ["Café docstring."]
    assert code == 'x = "é"\ndef f():\n    return "ü"\n'


def test_select_rows_ignores_input_order_and_splits_by_file():
    sources = [(f"pkg/m{i}.py", f'"""Doc {i}."""\ndef f{i}():\n    return {i}\n') for i in range(30)]
    config = CorpusConfig(max_files=20, validation_fraction=0.2)
    forward = select_rows(sources, config)
    assert select_rows(list(reversed(sources)), config) == forward
    assert cm.corpus_fingerprint(forward) == cm.corpus_fingerprint(select_rows(sources[::-1], config))
    for domain in cm.DOMAINS:
        train = {r["path"] for r in forward[domain]["train"]}
        val = {r["path"] for r in forward[domain]["validation"]}
        assert train and val and not train & val
        assert len(train | val) == 20
    # a path's split comes from its hash alone (at most one file is moved to fill an empty split)
    val = {r["path"] for d in cm.DOMAINS for r in forward[d]["validation"]}
    hashed = {p for p, _ in sources[:30] if cm.assign_split(p, 0.2) == "validation"}
    assert len(val ^ (hashed & {r["path"] for r in forward["code"]["train"] + forward["code"]["validation"]})) <= 1


def test_list_source_files_skips_tests_and_is_sorted(tmp_path):
    for rel in (
        "b.py",
        "a.py",
        "pkg/c.py",
        "test/t.py",
        "pkg/tests/t.py",
        "idlelib/idle_test/x.py",
        "site-packages/s.py",
    ):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x = 1\n")
    (tmp_path / "notes.txt").write_text("not python")
    assert list_source_files(tmp_path) == ["a.py", "b.py", "pkg/c.py"]


def test_configs_name_bad_values():
    with pytest.raises(ValueError, match="validation_fraction=1.5"):
        CorpusConfig(validation_fraction=1.5)
    with pytest.raises(ValueError, match="max_files=1"):
        CorpusConfig(max_files=1)
    with pytest.raises(ValueError, match="num_experts_per_tok=3 exceeds num_local_experts=2"):
        BaseModelConfig(num_local_experts=2, num_experts_per_tok=3)
    with pytest.raises(ValueError, match="experts_implementation='fast'"):
        BaseModelConfig(experts_implementation="fast")
    with pytest.raises(ValueError, match="pretrain_domain='docs'"):
        BaseModelConfig(pretrain_domain="docs")
    with pytest.raises(ValueError, match="vocab_size=100"):
        TokenizerConfig(vocab_size=100)


# -- the stdlib corpus -------------------------------------------------------------------------------------


def test_corpus_is_deterministic(small_corpus, tmp_path):
    again = build_corpus(cache_dir=tmp_path, config=SMALL)
    assert again.built and small_corpus.path.name == again.path.name
    assert again.fingerprint == small_corpus.fingerprint
    assert again.manifest["files"] == small_corpus.manifest["files"]
    for name in ("code", "prose", "mixed"):
        for split in cm.SPLITS:
            assert list(again[name][split]["path"]) == list(small_corpus[name][split]["path"])
            assert list(again[name][split]["text"]) == list(small_corpus[name][split]["text"])


def test_corpus_splits_by_file(small_corpus):
    paths = {split: {p for d in cm.DOMAINS for p in list(small_corpus[d][split]["path"])} for split in cm.SPLITS}
    assert paths["train"] and paths["validation"]
    assert not paths["train"] & paths["validation"]
    assert len(paths["train"] | paths["validation"]) <= SMALL.max_files
    for split in cm.SPLITS:
        mixed = small_corpus.mixed[split]
        assert len(mixed) == len(small_corpus.code[split]) + len(small_corpus.prose[split])
        assert sorted(list(mixed["text"])) == sorted(
            list(small_corpus.code[split]["text"]) + list(small_corpus.prose[split]["text"])
        )
        # mixed is shuffled, not code then prose
        assert list(mixed["domain"]) != sorted(mixed["domain"])


def test_corpus_domains_differ(small_corpus):
    statement = ("def ", "class ", "import ", "from ", "return ", "if ", "for ", "self.")

    def statement_share(texts):
        lines = [line.strip() for t in texts for line in t.splitlines() if line.strip()]
        return sum(line.startswith(statement) for line in lines) / len(lines)

    code = list(small_corpus.code["train"]["text"]) + list(small_corpus.code["validation"]["text"])
    prose = list(small_corpus.prose["train"]["text"]) + list(small_corpus.prose["validation"]["text"])
    assert statement_share(code) > 0.3
    assert statement_share(prose) < 0.05
    for text in code:
        tree = ast.parse(text)  # every code row is valid Python ...
        assert _all_docstrings(tree) == []  # ... with every docstring moved to prose
    assert set(list(small_corpus.code["train"]["domain"])) == {"code"}
    assert set(list(small_corpus.prose["train"]["domain"])) == {"prose"}


def test_corpus_cache_is_reused(small_corpus, cache, monkeypatch):
    manifest_mtime = (small_corpus.path / cm.MANIFEST).stat().st_mtime_ns
    calls = []
    monkeypatch.setattr(cm, "select_rows", lambda *a, **k: calls.append(1))
    again = build_corpus(cache_dir=cache, config=SMALL)
    assert not again.built and calls == []
    assert (again.path / cm.MANIFEST).stat().st_mtime_ns == manifest_mtime
    assert again.fingerprint == small_corpus.fingerprint
    # the env var is the default cache root
    monkeypatch.setenv("HF_MOEPRUNE_CACHE", str(cache))
    assert cm.cache_root() == cache
    assert not build_corpus(config=SMALL).built


def test_interrupted_build_leaves_no_cache(tmp_path, monkeypatch):
    real_save = cm.DatasetDict.save_to_disk
    saved = []

    def save_then_crash(self, path, *args, **kwargs):
        if saved:
            raise KeyboardInterrupt("simulated interruption mid-write")
        saved.append(path)
        return real_save(self, path, *args, **kwargs)

    monkeypatch.setattr(cm.DatasetDict, "save_to_disk", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        build_corpus(cache_dir=tmp_path, config=SMALL)
    assert saved  # something had been written before the crash ...
    assert list((tmp_path / "demo").iterdir()) == []  # ... and none of it is left
    monkeypatch.setattr(cm.DatasetDict, "save_to_disk", real_save)
    assert build_corpus(cache_dir=tmp_path, config=SMALL).built


def test_cached_build_requires_marker(tmp_path):
    target = tmp_path / "entry"
    with pytest.raises(RuntimeError, match="marker"):
        cm.cached_build(target, lambda tmp: (tmp / "data").write_text("x"))
    assert not target.exists()
    assert cm.cached_build(target, lambda tmp: (tmp / cm.MANIFEST).write_text("{}"))
    assert not cm.cached_build(target, lambda tmp: pytest.fail("must not rebuild"))


# -- tokenizer and packing ---------------------------------------------------------------------------------


def test_tokenizer_round_trip_and_cache(small_corpus, cache):
    tokenizer = load_or_train_tokenizer(small_corpus, TINY_TOKENIZER, cache)
    assert len(tokenizer) == TINY_TOKENIZER.vocab_size
    reloaded = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    snippet = 'def f(x):\n\tif x:  # café\n        return {"a": [1, 2]}  \n\n\nπ = 3.14159\n'
    ids = reloaded(snippet, add_special_tokens=False)["input_ids"]
    assert reloaded.decode(ids) == snippet
    assert ids == tokenizer(snippet, add_special_tokens=False)["input_ids"]
    specials = {reloaded.pad_token_id, reloaded.bos_token_id, reloaded.eos_token_id}
    assert len(specials) == 3 and None not in specials
    assert len(ids) < len(snippet.encode())  # merges learned, not raw bytes
    marker = bm.Path(tokenizer.name_or_path) / bm.TOKENIZER_MARKER
    mtime = marker.stat().st_mtime_ns
    load_or_train_tokenizer(small_corpus, TINY_TOKENIZER, cache)
    assert marker.stat().st_mtime_ns == mtime


def test_pack_token_ids_exact():
    assert pack_token_ids([[1, 2, 3], [4], [5, 6]], separator=0, block_size=3) == [[1, 2, 3], [0, 4, 0], [5, 6, 0]]
    # the tail [5, 0] is shorter than a block and dropped
    assert pack_token_ids([[1, 2, 3], [4], [5]], separator=0, block_size=3) == [[1, 2, 3], [0, 4, 0]]
    assert pack_token_ids([[1]], separator=0, block_size=3) == []
    with pytest.raises(ValueError, match="block_size=1"):
        pack_token_ids([[1]], 0, 1)


def test_tokenize_and_pack(small_corpus, cache):
    tokenizer = load_or_train_tokenizer(small_corpus, TINY_TOKENIZER, cache)
    packed = tokenize_and_pack(small_corpus.prose, tokenizer, block_size=16)
    assert set(packed) == set(cm.SPLITS)
    train = packed["train"]
    assert train.column_names == ["input_ids", "labels"]
    ids = torch.tensor(list(train["input_ids"]))
    assert ids.shape[1] == 16 and torch.equal(ids, torch.tensor(list(train["labels"])))
    n_docs = len(small_corpus.prose["train"])
    n_tokens = sum(
        len(x) for x in tokenizer(list(small_corpus.prose["train"]["text"]), add_special_tokens=False)["input_ids"]
    )
    assert ids.numel() == (n_tokens + n_docs) // 16 * 16
    assert int((ids == tokenizer.eos_token_id).sum()) in (n_docs - 1, n_docs)  # the last one may be cut


# -- specialisation maths ----------------------------------------------------------------------------------


def test_expert_histogram_counts_top_k_picks():
    logits = torch.tensor([[3.0, 2.0, 0.0, -1.0], [0.0, 1.0, 5.0, 4.0], [9.0, 0.0, 8.0, 0.0]])
    assert expert_histogram(logits, top_k=2).tolist() == [2.0, 1.0, 2.0, 1.0]
    assert expert_histogram(logits, top_k=1).tolist() == [2.0, 0.0, 1.0, 0.0]


def test_divergence_and_entropy_reference_values():
    uniform, one_hot = torch.ones(8), torch.tensor([5.0, 0, 0, 0, 0, 0, 0, 0])
    assert normalized_entropy(uniform) == pytest.approx(1.0)
    assert normalized_entropy(one_hot) == pytest.approx(0.0)
    assert normalized_entropy(torch.tensor([1.0, 1, 0, 0])) == pytest.approx(0.5)
    p, q = torch.tensor([3.0, 1, 0, 0]), torch.tensor([0.0, 0, 2, 2])
    assert jensen_shannon(p, q) == pytest.approx(1.0)  # disjoint supports
    assert jensen_shannon(p, 2 * p) == pytest.approx(0.0)  # histograms are normalised
    r = torch.tensor([1.0, 1, 1, 1])
    expected = 0.5 * (0.75 * math.log2(0.75 / 0.5) + 0.25 * math.log2(0.25 / 0.25)) + 0.5 * (
        0.25 * math.log2(0.25 / 0.5) + 0.25 * math.log2(0.25 / 0.25) + 2 * 0.25 * math.log2(0.25 / 0.125)
    )
    assert jensen_shannon(p, r) == pytest.approx(expected) == pytest.approx(jensen_shannon(r, p))


def test_unigram_cross_entropy():
    counts = torch.tensor([3.0, 1.0, 0.0, 0.0])  # smoothed: [4, 2, 1, 1] / 8
    assert unigram_cross_entropy(counts, torch.tensor([0, 1])) == pytest.approx(-(math.log(0.5) + math.log(0.25)) / 2)
    assert unigram_cross_entropy(torch.zeros(16), torch.arange(16)) == pytest.approx(math.log(16))


# -- base model --------------------------------------------------------------------------------------------


def test_tiny_pretraining_produces_loadable_cached_folder(cache):
    path = load_or_train_base_model(TINY_RECIPE, SMALL, TINY_TOKENIZER, cache)
    info = json.loads((path / bm.BUILD_INFO).read_text())
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert model.config.model_type == "mixtral"
    assert model.config.num_local_experts == 4 and model.config.vocab_size == len(tokenizer) == 400
    assert model.config.output_router_logits and model.config.router_aux_loss_coef == 0.01
    assert info["num_parameters"] == model.num_parameters()
    assert info["tokens_seen"] == 3 * 4 * 32
    # the saved weights are trained ones, not the initialisation
    init = bm.init_model(TINY_RECIPE, tokenizer)
    assert torch.equal(init.model.embed_tokens.weight, bm.init_model(TINY_RECIPE, tokenizer).model.embed_tokens.weight)
    assert not torch.equal(init.model.layers[0].mlp.gate.weight, model.model.layers[0].mlp.gate.weight)
    held = info["held_out"]
    assert set(held["domains"]) == {"code", "prose"} and len(held["layers"]) == 2
    for layer in held["layers"]:
        assert 0.0 <= layer["js_divergence_bits"] <= 1.0
        assert sum(layer["usage_code"]) == pytest.approx(1.0, abs=1e-3)
    assert all(math.isfinite(d["loss"]) for d in held["domains"].values())
    ids = tokenizer("def f(x):\n    return x\n", return_tensors="pt")["input_ids"]
    out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (1, ids.shape[1], 400) and torch.isfinite(out.loss)
    # second call: the cached folder, untouched
    mtime = (path / bm.BUILD_INFO).stat().st_mtime_ns
    assert load_or_train_base_model(TINY_RECIPE, SMALL, TINY_TOKENIZER, cache) == path
    assert (path / bm.BUILD_INFO).stat().st_mtime_ns == mtime


def test_single_domain_pretraining_reads_only_that_domain(small_corpus, cache):
    code_only = dataclasses.replace(TINY_RECIPE, pretrain_domain="code")
    path = load_or_train_base_model(code_only, SMALL, TINY_TOKENIZER, cache)
    tokenizer = load_or_train_tokenizer(small_corpus, TINY_TOKENIZER, cache)
    info = json.loads((path / bm.BUILD_INFO).read_text())
    code_blocks = tokenize_and_pack(DatasetDict(train=small_corpus.code["train"]), tokenizer, TINY_RECIPE.block_size)
    mixed_blocks = tokenize_and_pack(DatasetDict(train=small_corpus.mixed["train"]), tokenizer, TINY_RECIPE.block_size)
    assert info["recipe"]["pretrain_domain"] == "code"
    assert info["train_blocks"] == len(code_blocks["train"]) < len(mixed_blocks["train"])
    # its own cache entry; the default (mixed) keeps the key it had before the field existed
    assert path != bm.base_model_dir(small_corpus, tokenizer, TINY_RECIPE, cache)
    old_recipe = dataclasses.asdict(TINY_RECIPE) | {"num_threads": None}
    del old_recipe["pretrain_domain"]
    old_key = cm.config_hash(
        bm.BASE_MODEL_FORMAT_VERSION, small_corpus.fingerprint, Path(tokenizer.name_or_path).name, old_recipe,
        transformers.__version__,
    )  # fmt: skip
    assert bm.base_model_dir(small_corpus, tokenizer, TINY_RECIPE, cache).name == f"base-model-{old_key}"


def test_specialisation_report_counts_specialists_and_dead_experts():
    # one layer, 4 experts: expert 0 code-only, expert 1 prose-only, expert 2 shared, expert 3 never used
    measured = {
        "code": {"loss": 1.0, "tokens": 10, "histograms": torch.tensor([[6.0, 0.0, 4.0, 0.0]])},
        "prose": {"loss": 2.0, "tokens": 10, "histograms": torch.tensor([[0.0, 3.0, 2.0, 0.0]])},
    }
    report = bm.specialisation_report(measured)
    (layer,) = report["layers"]
    assert layer["code_preference"] == [1.0, 0.0, 0.5, None]
    assert (layer["experts_mostly_code"], layer["experts_mostly_prose"], layer["dead_experts"]) == (1, 1, 1)
    assert layer["usage_code"] == [0.6, 0.0, 0.4, 0.0]
    assert layer["js_divergence_bits"] == pytest.approx(
        round(jensen_shannon(torch.tensor([6.0, 0, 4, 0]), torch.tensor([0.0, 3, 2, 0])), 4)
    )
    assert report["domains"] == {"code": {"loss": 1.0, "tokens": 10}, "prose": {"loss": 2.0, "tokens": 10}}
    with pytest.raises(ValueError, match="two domains"):
        bm.specialisation_report({"code": measured["code"]})

"""Calibration blocks are read as a stream: the same blocks as packing the whole file, at the cost of the
blocks asked for (a huge one-line JSONL with --max_blocks 4 no longer tokenizes the whole line; issue 16)."""

import json

import pytest
import torch
from transformers import AutoTokenizer

import hf_moeprune.data as data
from hf_moeprune.data import calibration_blocks, load_text_dataset, tokenize_and_pack


@pytest.mark.parametrize("max_blocks", [3, 10_000])
def test_same_blocks_as_packing_everything(workspace, max_blocks):
    tokenizer = AutoTokenizer.from_pretrained(workspace / "model")
    path = str(workspace / "data.jsonl")
    packed = tokenize_and_pack(load_text_dataset(path, "body"), tokenizer, 16)["train"]
    expected = torch.tensor(packed["input_ids"][:max_blocks])
    assert torch.equal(calibration_blocks(path, tokenizer, "body", 16, max_blocks), expected)


def test_one_huge_line_is_tokenized_only_as_far_as_needed(workspace, tmp_path, monkeypatch):
    tokenizer = AutoTokenizer.from_pretrained(workspace / "model")
    monkeypatch.setattr(data, "LONG_TEXT_CHARS", 2_000)
    words = " ".join(["def dumps obj", "return self", "import re"] * 20_000)  # ~500k characters, one line
    path = tmp_path / "huge.jsonl"
    path.write_text(json.dumps({"text": words}) + "\n")
    seen = []

    class Counting:
        eos_token_id = tokenizer.eos_token_id

        def __call__(self, text, **kwargs):
            seen.append(len(text))
            return tokenizer(text, **kwargs)

    blocks = calibration_blocks(str(path), Counting(), "text", 16, 4)
    assert blocks.shape == (4, 16)
    assert sum(seen) <= 2_000, f"tokenized {sum(seen)} characters for 64 tokens"
    whole = tokenizer(words, add_special_tokens=False)["input_ids"][:64]
    assert blocks.flatten().tolist() == whole

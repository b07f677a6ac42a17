"""Text data for the CLIs: a ``datasets`` dataset saved on disk, JSONL, or plain text files; packed for causal LM."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path

from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst")


def load_text_dataset(path: str, text_field: str = "text", validation_fraction: float = 0.0, seed: int = 0):
    """Load ``path`` as a ``DatasetDict`` with a ``text`` column.

    ``path`` may be a folder written by ``Dataset(Dict).save_to_disk``, a ``.jsonl``/``.json`` file, a text
    file, or a folder of text files. Without a ``validation`` split, ``validation_fraction`` of the rows
    is held out (deterministically, by ``seed``).
    """
    source = Path(path)
    if not source.exists():
        raise FileNotFoundError(f"data path {path!r} does not exist")
    check_text_files(source)
    if source.is_dir() and ((source / "dataset_dict.json").exists() or (source / "dataset_info.json").exists()):
        loaded = load_from_disk(str(source))
    elif source.suffix in (".jsonl", ".json"):
        loaded = load_dataset("json", data_files=str(source))
    elif source.is_file():
        loaded = load_dataset("text", data_files=str(source), sample_by="paragraph")
    else:
        files = sorted(str(p) for p in source.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise ValueError(f"data folder {path!r} holds no saved dataset and no {list(TEXT_SUFFIXES)} files")
        loaded = load_dataset("text", data_files=files, sample_by="document")
    if isinstance(loaded, Dataset):
        loaded = DatasetDict({"train": loaded})
    if "train" not in loaded:
        raise ValueError(f"data {path!r} has splits {list(loaded)}; a 'train' split is required")
    columns = loaded["train"].column_names
    if text_field not in columns:
        raise ValueError(f"data {path!r} has columns {columns}; no text field {text_field!r} (set --text_field)")
    if text_field != "text":
        loaded = loaded.rename_column(text_field, "text")
    loaded = DatasetDict(
        {split: ds.filter(lambda row: bool(row["text"] and row["text"].strip())) for split, ds in loaded.items()}
    )
    if "validation" not in loaded and validation_fraction > 0:
        split = loaded["train"].train_test_split(test_size=validation_fraction, seed=seed)
        loaded = DatasetDict({"train": split["train"], "validation": split["test"]})
    logger.info("loaded %s: %s", path, {split: len(ds) for split, ds in loaded.items()})
    return loaded


def _text_lines(path: Path):
    """``(line number, line)`` of each non-blank line; a line that is not UTF-8 fails naming the file and line."""
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(f"{path}:{number}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
            if line.strip():
                yield number, line


def _jsonl_rows(path: Path):
    """``(line number, row)`` of each record of a ``.jsonl`` file; a line that is not a JSON object fails naming
    the file and line."""
    import json

    for number, line in _text_lines(path):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: not a JSON object ({exc.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{number}: a JSON {type(row).__name__}, not an object")
        yield number, row


def _empty_file_error(path: Path) -> ValueError:
    return ValueError(f"data file {str(path)!r} is empty (no records)")


def check_text_files(source: Path) -> None:
    """Fail with the file and line of the first line that is not UTF-8 (and, in a ``.jsonl`` file, not a JSON
    object), and on a data file without any record, before ``datasets`` reads it (its errors name neither)."""
    if source.is_dir():
        if (source / "dataset_dict.json").exists() or (source / "dataset_info.json").exists():
            return  # a saved dataset (Arrow), not text
        files = sorted(p for p in source.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
    else:
        files = [source]
    for path in files:
        records = sum(1 for _ in (_jsonl_rows(path) if path.suffix == ".jsonl" else _text_lines(path)))
        if records == 0 and not source.is_dir():
            raise _empty_file_error(path)


def pack_token_ids(sequences: Iterable[list[int]], separator: int, block_size: int) -> list[list[int]]:
    """Concatenate sequences, each followed by ``separator``, and cut the stream into full blocks.

    The tail shorter than ``block_size`` is dropped so every block has the same length and needs no padding.
    """
    if block_size < 2:
        raise ValueError(f"block_size={block_size} must be >= 2 (a token and the one it predicts)")
    stream = [tok for seq in sequences for tok in (*seq, separator)]
    usable = len(stream) - len(stream) % block_size
    return [stream[i : i + block_size] for i in range(0, usable, block_size)]


def tokenize_and_pack(dataset_dict: DatasetDict, tokenizer, block_size: int = 128) -> DatasetDict:
    """Tokenize the ``text`` column and pack it into ``block_size`` blocks with ``input_ids`` and ``labels``.

    The result feeds ``Trainer`` with its default collator (labels equal inputs; the model shifts them).
    """
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no eos_token to separate documents")

    def pack(batch: Mapping[str, list]) -> dict[str, list]:
        ids = tokenizer(batch["text"], add_special_tokens=False, verbose=False)["input_ids"]
        blocks = pack_token_ids(ids, tokenizer.eos_token_id, block_size)
        return {"input_ids": blocks, "labels": [list(b) for b in blocks]}

    packed = DatasetDict(
        {
            split: ds.map(
                pack,
                batched=True,
                batch_size=1000,
                remove_columns=ds.column_names,
                keep_in_memory=True,
                desc=f"tokenizing + packing {split}",
            )
            for split, ds in dataset_dict.items()
        }
    )
    empty = [split for split, ds in packed.items() if len(ds) == 0]
    if empty:
        raise ValueError(f"split(s) {empty} hold fewer than block_size={block_size} tokens after tokenization")
    return packed


def calibration_blocks(path: str, tokenizer, text_field: str = "text", block_size: int = 128, max_blocks: int = 256):
    """The first ``max_blocks`` packed ``block_size`` token blocks of ``path``'s train split, as an int64
    tensor ``[blocks, block_size]`` (full blocks: no padding, no attention mask needed)."""
    import torch

    if max_blocks < 1:
        raise ValueError(f"max_blocks={max_blocks} must be >= 1")
    if block_size < 2:
        raise ValueError(f"block_size={block_size} must be >= 2 (a token and the one it predicts)")
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no eos_token to separate documents")
    # Streamed: tokenize row by row and stop once max_blocks blocks are full, so a large file (or one huge line)
    # costs what the blocks need, not the whole corpus. Same blocks as packing everything and taking the first.
    needed = max_blocks * block_size
    stream: list[int] = []
    for row in load_text_dataset(path, text_field)["train"]:
        for piece in _pieces(row["text"]):
            stream += tokenizer(piece, add_special_tokens=False, verbose=False)["input_ids"]
            if len(stream) >= needed:
                break
        else:
            stream.append(tokenizer.eos_token_id)
        if len(stream) >= needed:
            break
    usable = min(len(stream), needed)
    usable -= usable % block_size
    if usable == 0:
        raise ValueError(f"data {path!r} holds fewer than block_size={block_size} tokens after tokenization")
    return torch.tensor(stream[:usable], dtype=torch.long).view(-1, block_size)


LONG_TEXT_CHARS = 1 << 20  # rows longer than this are tokenized in pieces (only as many as the blocks need)


def _pieces(text: str):
    """``text`` whole when short; a long one in ``LONG_TEXT_CHARS`` pieces cut at whitespace, so tokenizing stops
    early. (A piece boundary at whitespace tokenizes like the whole for whitespace-split tokenizers.)"""
    if len(text) <= LONG_TEXT_CHARS:
        yield text
        return
    start = 0
    while start < len(text):
        end = min(len(text), start + LONG_TEXT_CHARS)
        if end < len(text):
            space = text.rfind(" ", start, end)
            end = space if space > start else end
        yield text[start:end]
        start = end


def load_calibration_texts(
    path: str, tokenizer, text_field: str = "text", messages_field: str = "messages"
) -> tuple[list[str], bool]:
    """Calibration texts of ``path`` and whether they came through the tokenizer's chat template.

    A ``.jsonl`` file whose rows hold ``messages_field`` (a list of ``{"role", "content"}`` turns, the format chat
    models are fine-tuned on) is rendered with ``tokenizer.apply_chat_template``, so calibration sees the tokens
    the model sees when it serves; other rows need ``text_field``. Other paths load as ``load_text_dataset``.
    """

    source = Path(path)
    if source.suffix != ".jsonl":
        return list(load_text_dataset(path, text_field)["train"]["text"]), False
    if not source.is_file():
        raise FileNotFoundError(f"data path {path!r} does not exist")
    texts, chat, records = [], False, 0
    # the same reader (and messages: bad UTF-8 or JSON at file:line, empty file) as training data
    for number, row in _jsonl_rows(source):
        records += 1
        if messages_field in row:
            messages = row[messages_field]
            if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
                raise ValueError(f"{path}:{number}: {messages_field!r} must be a list of {{role, content}} objects")
            if getattr(tokenizer, "chat_template", None) is None:
                raise ValueError(
                    f"{path}:{number}: chat messages need a tokenizer with a chat_template; "
                    f"{getattr(tokenizer, 'name_or_path', tokenizer)!r} has none"
                )
            texts.append(tokenizer.apply_chat_template(messages, tokenize=False))
            chat = True
        elif text_field in row:
            if row[text_field] and str(row[text_field]).strip():
                texts.append(str(row[text_field]))
        else:
            raise ValueError(f"{path}:{number}: row has neither {messages_field!r} nor {text_field!r}: {sorted(row)}")
    if records == 0:
        raise _empty_file_error(source)
    if not texts:
        raise ValueError(f"data {path!r} holds no calibration text")
    logger.info("loaded %d calibration rows from %s (chat template: %s)", len(texts), path, chat)
    return texts, chat


def calibration_samples(texts: Iterable[str], tokenizer, max_length: int, max_samples: int) -> list[list[int]]:
    """One token sequence per text (unpacked: no sample sees another's tokens), cut to ``max_length``; the first
    ``max_samples`` non-empty ones. A rendered chat template already holds its special tokens, so none are added."""
    if max_length < 1 or max_samples < 1:
        raise ValueError(f"max_length={max_length} and max_samples={max_samples} must be >= 1")
    samples = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"][:max_length]
        if ids:
            samples.append(ids)
        if len(samples) == max_samples:
            break
    if not samples:
        raise ValueError("no calibration text produced any token")
    return samples


def pad_batches(samples: list[list[int]], batch_size: int, pad_token_id: int) -> list[dict]:
    """Right-padded batches with an attention mask (padding is excluded from every statistic)."""
    import torch

    batches = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, sample in enumerate(chunk):
            ids[row, : len(sample)] = torch.tensor(sample, dtype=torch.long)
            mask[row, : len(sample)] = 1
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches

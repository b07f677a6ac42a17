"""Batched generation for pruned, quantized or stock MoE causal LMs, from a JSONL file of prompts.

Pipeline: read and validate the prompt lines -> tokenize -> hand token lists to an engine -> turn
each finished token list into a completion (EOS / stop-string / length rules) -> write it.

Engines (registry ``ENGINES``):

* ``padded``: prompts are sorted by token length inside windows of ``sort_window`` consecutive
  prompts, cut into batches of ``batch_size``, left-padded and generated with ``model.generate`` and
  its KV cache. Works with anything that has ``generate`` (stock, pruned, quantized models).
* ``continuous``: transformers' continuous batching manager (paged KV cache, requests join and leave
  the running batch as they start and finish; ``batch_size`` caps the requests per step). Falls back
  to ``padded`` for every prompt it could not finish (model without continuous batching support,
  unsupported attention, a failed request).
* ``auto``: ``padded``, the faster of the two on CPU in ``benchmarks/inference_benchmark.py``; and the
  only one whose sampling is reproducible from a seed (continuous batching samples in a background
  thread whose batch composition depends on timing).

Output order rule: results are written in the prompts' original order. A result is appended (and
flushed) as soon as it and every result before it are done; later results wait in memory. Engines
finish prompts roughly in order (``padded`` processes a window at a time, starting with the batch that
holds the window's first prompt), so an interrupted run loses at most about one window of finished
work, and ``resume`` then skips every id already in the output file. Because the file is always an
in-order prefix, a resumed run completes it in the original order.

Finish rules, per prompt: an EOS token ends the completion (``finish_reason="eos"``, EOS not in the
text); else the earliest stop string ends it (``"stop"``, the text is cut just before the stop
string); else ``"length"`` (``max_new_tokens`` reached). ``tokens`` counts the generated tokens the
completion used, including the EOS token or the token that completed the stop string.
"""

from __future__ import annotations

from hf_moeprune.inference.completion import FINISH_REASONS, Completion, finish_completion
from hf_moeprune.inference.engines import (
    ENGINES,
    EXPERTS_IMPLEMENTATIONS,
    Engine,
    OnDone,
    continuous_engine,
    padded_engine,
    plan_batches,
    resolve_engine,
    set_experts_implementation,
)
from hf_moeprune.inference.generator import (
    BatchGenerator,
    build_generation_config,
    check_output_file,
    generate,
    generate_file,
)
from hf_moeprune.inference.memory import PeakMemory
from hf_moeprune.inference.options import GenerationOptions
from hf_moeprune.inference.output import OrderedWriter, exclusive_output, jsonl_appender, mark_as_ours, writer_marker
from hf_moeprune.inference.prompts import BadLine, Prompt, completed_ids, parse_prompt_lines, read_prompts
from hf_moeprune.inference.stats import GenerationStats

__all__ = [
    "ENGINES",
    "EXPERTS_IMPLEMENTATIONS",
    "FINISH_REASONS",
    "BadLine",
    "BatchGenerator",
    "Completion",
    "Engine",
    "GenerationOptions",
    "GenerationStats",
    "OnDone",
    "OrderedWriter",
    "PeakMemory",
    "Prompt",
    "build_generation_config",
    "completed_ids",
    "continuous_engine",
    "exclusive_output",
    "finish_completion",
    "generate",
    "check_output_file",
    "generate_file",
    "jsonl_appender",
    "mark_as_ours",
    "padded_engine",
    "parse_prompt_lines",
    "plan_batches",
    "read_prompts",
    "resolve_engine",
    "set_experts_implementation",
    "writer_marker",
]


# --------------------------------------------------------------------------------------------------------------
# command line

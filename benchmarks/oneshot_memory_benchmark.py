"""Peak memory of pruning a checkpoint: streaming surgery and layer-wise one-shot REAP vs loading the model.

Builds a random-init bf16 Mixtral checkpoint (default 40 layers x 32 experts, ~4 GB; written tensor by tensor in
the legacy per-expert key layout that ``save_pretrained`` writes for Mixtral, so nothing of that size is ever held
in memory here), then runs each command in its own process and records that process's peak RSS
(``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss`` read by a fresh wrapper process per run):

1. ``hf-moeprune prune --keep ...`` (streaming surgery, the default);
2. ``hf-moeprune prune --data ... --criterion reap`` (layer-wise calibration + streaming surgery);
3. ``hf-moeprune prune --keep ... --streaming false`` (load, prune, save: the path before this change);
4. ``python -c "import hf_moeprune.commands, torch, transformers"`` (what importing the libraries alone costs);
5. command 2 again on a smaller checkpoint (``--phase_layers``, same layer size), sampling the process's own
   memory phase by phase (import, calibration data, each layer, surgery) to show what the peak is made of.

Usage: python benchmarks/oneshot_memory_benchmark.py [--layers 40] [--workdir /tmp/moeprune-memory]
"""

from __future__ import annotations

import argparse
import inspect
import json
import json as json_module
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
WRAPPER = (
    "import resource, subprocess, sys, time\n"
    "start = time.perf_counter()\n"
    "rc = subprocess.run(sys.argv[1:]).returncode\n"
    "print('PEAK', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, rc, time.perf_counter() - start)\n"
)

# The same layer-wise one-shot command, run in-process with a thread sampling /proc/self/status every 10 ms, and
# the phase boundaries marked by wrapping library functions: where the peak comes from (resident = anonymous memory
# + mapped files such as shared libraries). Linux only.
PHASES = """
import json, sys, threading, time
def status():
    out = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out
phases, current, done = [], {"name": "import torch, transformers, hf_moeprune"}, False
def sampler():
    while not done:
        s = status()
        for k, v in s.items():
            current["peak_" + k] = max(current.get("peak_" + k, 0), v)
        time.sleep(0.01)
def mark(name):
    global current
    s = status()
    for k, v in s.items():
        current["peak_" + k] = max(current.get("peak_" + k, 0), v)
        current["end_" + k] = v
    phases.append(current)
    current = {"name": name}
threading.Thread(target=sampler, daemon=True).start()
import hf_moeprune.commands, hf_moeprune.streaming as streaming, torch, transformers
from hf_moeprune.commands import main, prune
def wrap(owner, attr, before, after=None):
    original = getattr(owner, attr)
    def wrapper(*args, **kwargs):
        mark(before(*args) if callable(before) else before)
        result = original(*args, **kwargs)
        if after:
            mark(after)
        return result
    setattr(owner, attr, wrapper)
import hf_moeprune.oneshot as oneshot
wrap(prune, "_calibration_batches", "calibration data (datasets + tokenizer)", "model skeleton")
wrap(streaming.ModuleLoader, "load_module_state",
     lambda self, layer: "embeddings + layer inputs" if layer is None else f"layer {layer} (load + forward)")
wrap(oneshot, "save_statistics", "statistics file + plan")
wrap(streaming, "prune_checkpoint", "streaming surgery (write the pruned shards)", "end")
rc = main(sys.argv[1:])
mark("end")
done = True
print("PHASES", json.dumps(phases))
sys.exit(rc)
"""


def build_checkpoint(folder: Path, layers: int, experts: int, hidden: int, intermediate: int) -> int:
    """Write a random bf16 Mixtral checkpoint shard by shard (one shard per decoder layer); returns its size."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, MixtralConfig
    from transformers.core_model_loading import revert_weight_conversion

    config = MixtralConfig(
        vocab_size=1024, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=8, num_key_value_heads=2, num_local_experts=experts, num_experts_per_tok=2,
        max_position_embeddings=512, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    config.dtype = "bfloat16"
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    # the key names and shapes save_pretrained would write (per-expert w1/w2/w3), computed on meta tensors
    names = revert_weight_conversion(meta, meta.state_dict())
    by_layer: dict[str, dict[str, tuple]] = {}
    for name, tensor in names.items():
        parts = name.split(".")
        unit = parts[2] if parts[1] == "layers" else "rest"
        by_layer.setdefault(unit, {})[name] = tuple(tensor.shape)
    folder.mkdir(parents=True)
    config.save_pretrained(folder)
    weight_map, total, count = {}, 0, len(by_layer)
    generator = torch.Generator().manual_seed(0)
    for i, (_unit, shapes) in enumerate(sorted(by_layer.items()), start=1):
        tensors = {}
        for name, shape in shapes.items():
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
            else:
                tensors[name] = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
            total += tensors[name].numel() * 2
        file = f"model-{i:05d}-of-{count:05d}.safetensors"
        save_file(tensors, folder / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    _tokenizer(folder)
    return total


def _tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    lines = inspect.getsource(json_module).splitlines()
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        lines, trainers.WordLevelTrainer(vocab_size=1024, special_tokens=["<pad>", "<s>", "</s>", "<unk>"])
    )
    PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    ).save_pretrained(folder)


def measure(cmd: list[str]) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", WRAPPER, *cmd], capture_output=True, text=True, env=env)
    line = [x for x in out.stdout.splitlines() if x.startswith("PEAK")][-1].split()
    if int(line[2]) != 0:
        raise RuntimeError(f"{cmd} failed:\n{out.stderr[-3000:]}")
    return {"peak_rss_bytes": int(line[1]), "seconds": round(float(line[3]), 1)}


def measure_phases(cli_args: list[str]) -> list[dict]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", PHASES, *cli_args], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{cli_args} failed:\n{out.stderr[-3000:]}")
    return json.loads([x for x in out.stdout.splitlines() if x.startswith("PHASES")][-1].split(" ", 1)[1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=40)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=512)
    parser.add_argument("--max_shard_size", default="100MB")
    parser.add_argument("--workdir", default="/tmp/moeprune-memory")
    parser.add_argument("--skip_in_memory", action="store_true", help="skip the load-everything baseline")
    parser.add_argument("--phase_layers", type=int, default=4,
                        help="layers of the smaller checkpoint on which the layer-wise run is profiled phase by "
                             "phase (0: skip)")  # fmt: skip
    args = parser.parse_args()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    start = time.perf_counter()
    size = build_checkpoint(work / "ckpt", args.layers, args.experts, args.hidden, args.intermediate)
    build_s = time.perf_counter() - start
    calib = work / "calib.txt"
    calib.write_text(inspect.getsource(json_module))
    keep = json.dumps({str(i): list(range(0, args.experts, 2)) for i in range(args.layers)})
    cli = [sys.executable, "-m", "hf_moeprune.commands", "--log-level", "WARNING", "prune", str(work / "ckpt")]
    runs = {
        "import_only": [sys.executable, "-c",
                        "import hf_moeprune.commands, hf_moeprune.streaming, torch, transformers"],
        "prune_keep_streaming": [*cli, "--output_dir", str(work / "keep"), "--keep", keep,
                                 "--max_shard_size", args.max_shard_size],
        "oneshot_reap_layerwise": [*cli, "--output_dir", str(work / "reap"), "--data", str(calib), "--criterion",
                                   "reap", "--target", "0.5", "--block_size", "128", "--max_blocks", "16",
                                   "--max_shard_size", args.max_shard_size, "--stats_out", str(work / "stats")],
    }  # fmt: skip
    if not args.skip_in_memory:
        runs["prune_keep_in_memory"] = [*cli, "--output_dir", str(work / "keep-mem"), "--keep", keep,
                                        "--streaming", "false"]  # fmt: skip
    results = {}
    for name, cmd in runs.items():
        results[name] = measure(cmd)
        results[name]["fraction_of_checkpoint"] = round(results[name]["peak_rss_bytes"] / size, 3)
        print(name, results[name], flush=True)
    phases, phase_size = None, None
    if args.phase_layers:
        phase_size = build_checkpoint(
            work / "ckpt-phases", args.phase_layers, args.experts, args.hidden, args.intermediate
        )
        oneshot_args = runs["oneshot_reap_layerwise"][3:]  # without `python -m hf_moeprune.commands`
        oneshot_args[oneshot_args.index("prune") + 1] = str(work / "ckpt-phases")
        oneshot_args[oneshot_args.index("--output_dir") + 1] = str(work / "reap-phases")
        oneshot_args[oneshot_args.index("--stats_out") + 1] = str(work / "stats-phases")
        phases = measure_phases(oneshot_args)
        for phase in phases:
            print("phase", phase, flush=True)
    same = None
    if "prune_keep_in_memory" in results:
        from safetensors import safe_open

        def read(folder):
            out = {}
            for f in sorted(folder.glob("*.safetensors")):
                with safe_open(f, "pt") as h:
                    for k in h.keys():  # noqa: SIM118 (safe_open is not a mapping)
                        out[k] = h.get_tensor(k)
            return out

        a, b = read(work / "keep"), read(work / "keep-mem")
        same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    command = "python " + " ".join(sys.argv)
    record = {
        "command": command,
        "checkpoint": {"bytes": size, "layers": args.layers, "experts": args.experts, "hidden": args.hidden,
                       "expert_intermediate": args.intermediate, "dtype": "bfloat16", "build_seconds": round(build_s)},
        "max_shard_size": args.max_shard_size,
        "runs": results,
        "streamed_equals_in_memory": same,
        "phases": {"checkpoint_layers": args.phase_layers, "checkpoint_bytes": phase_size, "phases": phases},
        "machine": "2 shared CPU cores, no GPU; several other jobs ran at the same time (timings are noisy)",
    }  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "oneshot_memory.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [
        "# Peak memory of pruning a checkpoint bigger than the budget",
        "",
        f"Command: `{command}`",
        "",
        f"Checkpoint: random-init bf16 Mixtral, {args.layers} layers x {args.experts} experts "
        f"(hidden {args.hidden}, expert intermediate {args.intermediate}), {size / 1e9:.2f} GB on disk, per-expert "
        f"legacy keys. Output shards: {args.max_shard_size}. Each command ran in its own process; peak RSS is that "
        "process's maximum resident set size.",
        "",
        "| run | peak RSS | share of checkpoint | wall time |",
        "|---|---|---|---|",
    ]
    for name, r in results.items():
        share = 100 * r["fraction_of_checkpoint"]
        lines.append(f"| {name} | {r['peak_rss_bytes'] / 1e9:.2f} GB | {share:.1f}% | {r['seconds']} s |")
    if same is not None:
        lines += ["", f"Streamed output byte-identical to the in-memory output: {same}."]
    lines += ["", "Timings: 2 shared CPU cores with other jobs running at the same time; read them as rough."]
    if phases:
        lines += [
            "",
            f"## Where the layer-wise run's memory goes (the same command on a {args.phase_layers}-layer checkpoint, "
            f"{phase_size / 1e9:.2f} GB, same layer size)",
            "",
            "Sampled every 10 ms inside the process (`/proc/self/status`): resident = anonymous (heap, tensors) + "
            "file-mapped (shared libraries, and files still mapped).",
            "",
            "| phase | peak resident | peak anonymous | peak file-mapped | resident at its end |",
            "|---|---|---|---|---|",
        ]
        for p in phases:
            lines.append(
                f"| {p['name']} | {p['peak_VmRSS'] / 1e6:.0f} MB | {p['peak_RssAnon'] / 1e6:.0f} MB | "
                f"{p['peak_RssFile'] / 1e6:.0f} MB | {p['end_VmRSS'] / 1e6:.0f} MB |"
            )
    (RESULTS / "oneshot_memory.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

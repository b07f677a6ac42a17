"""The README's family tables, generated from the registry (``python -m hf_moeprune.adapters.table README.md``
rewrites them in place; ``tests/test_families.py`` fails when they drift)."""

from __future__ import annotations

import sys
from pathlib import Path

from hf_moeprune.adapters.base import ADAPTERS, RULE_RENORMALIZES, UNSUPPORTED, MoEAdapter, join_path
from hf_moeprune.format.modeling_moeprune import DEFAULT_ROUTER_OUTPUT

START, END = "<!-- family-table:start -->", "<!-- family-table:end -->"

RULES = {
    "softmax_topk_renorm": "softmax, top-k renormalised",
    "softmax_topk": "softmax, top-k renormalised only with `norm_topk_prob`",
    "topk_softmax": "top-k on logits, softmax over the k",
    "sigmoid_group_limited": "sigmoid + `e_score_correction_bias` on the choice, group-limited top-k",
    "softmax_topk_scaled": "softmax, top-k never renormalised, x `routed_scaling_factor`",
    "softmax_topk_renorm_biased": "softmax, top-k on probability + `[1, experts]` correction bias, renormalised",
    "sigmoid_topk_block_bias": "sigmoid + the block's correction bias on the choice, unsorted top-k, renormalised",
    "sigmoid_topk_block_bias_sorted": "sigmoid + the block's `expert_bias` on the choice, top-k, renormalised, x "
    "`route_scale`",
    "sigmoid_topk_expert_bias": "sigmoid + the block's `expert_bias` on the choice, top-k, renormalised with "
    "`norm_topk_prob`",
    "sigmoid_group_limited_sorted": "as `deepseek_v3` with a sorted top-k; the block scales the output",
    "sigmoid_group_limited_zero_fill": "as `deepseek_v3`, other groups masked with 0.0; groups optional",
    "sigmoid_topk": "sigmoid (+ `e_score_correction_bias` where the router has one) on the choice, top-k, renormalised",
    "sigmoid_topk_unsorted": "sigmoid + `e_score_correction_bias` on the choice, unsorted top-k, renormalised",
    "sigmoid_topk_unsorted_scaled": "sigmoid + `e_score_correction_bias` on the choice, unsorted top-k, renormalised, "
    "x `routed_scaling_factor`",
    "logit_topk_sigmoid": "top-k on logits + `e_score_correction_bias`, sigmoid of the chosen logits",
    "logit_topk_sigmoid_unnormalized": "top-k on logits, sigmoid of the chosen logits (others 0), never renormalised",
    "softmax_topk_renorm_expert_scale": "router returns probabilities; top-k renormalised, x `per_expert_scale`",
    "score_fn_topk": "the config's `scoring_func` + `e_score_correction_bias` on the choice, unsorted top-k, "
    "renormalised, x `routed_scaling_factor`",
    "sparsemixer_eval": "SparseMixer top-2 (eval mode; sampled in training)",
    "softmax_topk_biased_scaled": "softmax over routed and zero-computation experts, unsorted top-k on probability + "
    "`e_score_correction_bias`, never renormalised, x `routed_scaling_factor`",
    "logsigmoid_topk_shared": "sigmoid + `e_score_correction_bias` on the choice, unsorted top-k; the chosen and the "
    "shared experts' logits normalised together (log-sigmoid), x `route_scale`",
    "softmax_group_limited": "softmax, group-limited unsorted top-k (groups by their top-2 sum), renormalised with "
    "`norm_topk_prob`, x `routed_scaling_factor`",
}
# rules not listed here: derived from adapters.base.RULE_RENORMALIZES
REMOVAL = {
    "softmax_topk_renorm": "leaves logits unchanged",
    "softmax_topk": "unchanged with `norm_topk_prob`; otherwise weights divide by the kept probability mass",
    "topk_softmax": "leaves logits unchanged",
    "sigmoid_group_limited": "unchanged with one group; with `{group}` > 1 only if each group's top-2 survive",
    "sigmoid_group_limited_sorted": "unchanged with one group; with `{group}` > 1 only if each group's top-2 survive",
    "sigmoid_group_limited_zero_fill": "unchanged with one group; with `{group}` > 1 only if each group's top-2 "
    "survive",
    "softmax_topk_scaled": "weights divide by the kept probability mass",
    "softmax_topk_biased_scaled": "weights divide by the kept probability mass",
    "softmax_group_limited": "unchanged with one group when renormalised (`norm_topk_prob`; Mistral-Large-4: always); "
    "with `{group}` > 1 only if each group's top-2 survive",
}


def _layout(adapter: MoEAdapter) -> str:
    where = f"`{adapter.layers_path}` " if adapter.layers_path else ""  # a vision-language model's language model
    parts = [f"{where}`{adapter.router_path}.{adapter.router_tensors[0]}`"]
    parts += [f"`{n}`" for n in adapter.router_tensors[1:]]
    parts.append(f"`{adapter.experts_path}`: " + ", ".join(f"`{n}`" for n in adapter.expert_tensors))
    parts += [f"`{join_path(adapter.block_attr, n)}`" for n in adapter.block_tensors]
    keep_all = adapter.keep_all_experts
    if keep_all is not None:
        values = " or ".join(f"`{v}`" for v in keep_all.values)
        tables = ", ".join(f"`{adapter.router_path}.{t}`" for t in keep_all.tables)
        parts.append(
            f"layers whose `{keep_all.layer_types_field}` entry is {values} keep all their experts"
            + (f" (expert ids in {tables})" if tables else "")
        )
    if adapter.extra_rows_field is not None:  # kept at the end of these router tensors, never pruned
        rows = ", ".join(f"`{n}`" for n in adapter.extra_row_tensors)
        parts.append(f"`{adapter.extra_rows_field}` unpruned rows after the routed experts in {rows}")
    if adapter.router_output != DEFAULT_ROUTER_OUTPUT:
        parts.append(f"router returns `{adapter.router_output}`")
    if adapter.experts_call != "routed":
        parts.append(f"experts called `{adapter.experts_call}`")
    return "; ".join(parts)


def _removal(routing: str) -> str:
    renormalizes = RULE_RENORMALIZES.get(routing)
    if renormalizes is None:
        return "unchanged with `norm_topk_prob`; otherwise the weights change"
    return "leaves logits unchanged" if renormalizes else "the weights of the remaining experts change"


def family_table() -> str:
    rows = [
        f"Supported: {len(ADAPTERS)} families.",
        "",
        "| model_type | expert count field | router and experts | routing | removing an expert no token picked |",
        "|---|---|---|---|---|",
    ]
    for name in sorted(ADAPTERS):
        adapter = ADAPTERS[name]
        removal = REMOVAL.get(adapter.routing, _removal(adapter.routing)).format(group=adapter.group_field)
        rule = RULES.get(adapter.routing, adapter.routing)
        # vision-language families: the field is in the language model's sub-config
        count = ".".join(filter(None, (adapter.text_config_attr, adapter.num_experts_field)))
        rows.append(f"| {name} | `{count}` | {_layout(adapter)} | {rule} | {removal} |")
    rows += ["", f"Not supported yet: {len(UNSUPPORTED)} families.", "", "| model_type | why |", "|---|---|"]
    rows += [f"| {name} | {UNSUPPORTED[name]} |" for name in sorted(UNSUPPORTED)]
    return "\n".join(rows)


def replace_table(text: str) -> str:
    """``text`` with the part between the family-table markers replaced by the generated tables."""
    if START not in text or END not in text:
        raise ValueError(f"the text has no {START} ... {END} section")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{family_table()}\n{END}{tail}"


if __name__ == "__main__":
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "README.md")
    path.write_text(replace_table(path.read_text()))

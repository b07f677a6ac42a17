"""Load-aware expert placement for expert parallelism: which device each expert lands on.

Expert-parallel runtimes (transformers ``DistributedConfig(ep_size=N)``, vLLM, Megatron) give device
``d`` the contiguous block ``[d * E/N, (d+1) * E/N)`` of each layer's experts. Reordering experts
(``hf_moeprune.permute_experts``, which keeps outputs identical) therefore chooses the partition of
experts into devices. This module computes that reordering from measured per-expert loads.

Conventions
-----------
* ``loads``: a 2-D tensor ``[layers, experts]`` when every layer has the same expert count, or a
  sequence of 1-D tensors (one per layer, lengths may differ after pruning), or a mapping
  ``{layer index: 1-D tensor}`` (the keys become ``PlacementPlan.layer_ids``). Values are token counts
  (or any non-negative work measure); NaN, infinite or negative values are rejected.
* Device load = sum of its experts' loads; a replicated expert's load is split evenly among its copies
  (vLLM sends each token to one replica chosen by a hash of the token index).
* ``balancedness = mean device load / max device load`` (1.0 is perfect; defined as 1.0 when all loads
  are zero), the metric vLLM's EPLB logs.

Algorithm (per layer): minimise the largest device load subject to every device holding the same number
of experts (balanced multiway number partitioning, NP-hard). Two starts:

1. greedy balanced packing, heaviest expert first onto the least-loaded device with room (the DeepSeek
   EPLB packing, kept as the ``"greedy"`` baseline);
2. the balanced largest differencing method (Karmarkar-Karp differencing for equal cardinality,
   Michiels et al. 2003): cut the sorted loads into rows of ``ep_size`` items and repeatedly merge the
   two partial partitions whose spread (max - min) is largest, largest subset of one with the smallest
   of the other;

each refined by local search: the best swap of one expert, else of two experts, between the most-loaded
device and another that brings both below the current peak; when there is none, the swap between any two
devices that narrows their gap most (the peak cannot rise, the sum of squared loads falls), which often
opens a new peak-lowering swap. It stops when no swap helps or the peak is within 0.01% of a lower bound
(``peak_lower_bound``). The better result is kept; if it is not strictly better than the current order,
the current order is kept (no weights move for nothing). Devices are interchangeable, so each planned
block goes to the device that already holds most of it, and equal-load experts are swapped back home.

Replicas (``num_redundant > 0``): each extra physical slot goes to the expert with the highest load per
copy (as in DeepSeek EPLB), then the copies are packed as items the same way, avoiding two copies of one
expert on one device where possible. The maps follow vLLM's ``EplbModelState`` layout:
``physical_to_logical_map [layers, experts + num_redundant]``, ``logical_to_physical_map
[layers, experts, num_redundant + 1]`` padded with -1, ``logical_replica_count [layers, experts]``.

Group-limited routing (DeepSeek-V3 ``n_group``) scores contiguous blocks of experts as groups, so the
checkpoint order may only permute whole groups and experts within a group (``permute_experts`` enforces
this). With ``num_groups > 1`` the order is planned at group level when each device holds whole groups,
or within each group when each group spans whole devices. The replica maps index logical experts, so
they are not constrained by groups.
"""

from __future__ import annotations

import heapq
import logging
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

__all__ = [
    "PLACEMENT_METHODS",
    "PlacementPlan",
    "balancedness",
    "device_loads",
    "peak_lower_bound",
    "plan_placement",
]

# Relative tolerance for "strictly better": loads are sums of floats, so ties must not flip on rounding.
_REL_TOL = 1e-9
# Stop refining once the peak is provably within this relative distance of the best reachable peak.
_NEAR_OPTIMAL = 1e-4


def _as_array(values) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().double()
    return np.asarray(values, dtype=np.float64)


def balancedness(device_loads: torch.Tensor | Sequence[float]) -> float:
    """Mean device load / max device load; 1.0 when every device is idle."""
    arr = _as_array(device_loads)
    peak = float(arr.max()) if arr.size else 0.0
    return 1.0 if peak <= 0.0 else float(arr.mean() / peak)


def device_loads(
    loads: torch.Tensor | Sequence[float], ep_size: int, order: Sequence[int] | None = None
) -> list[float]:
    """Per-device load of one layer when its experts, reordered by ``order``, are cut into ``ep_size`` blocks."""
    w = _as_array(loads)
    if ep_size < 1 or w.size % ep_size:
        raise ValueError(f"{w.size} experts cannot be split into ep_size={ep_size} equal blocks")
    if order is not None:
        w = w[np.asarray(order, dtype=np.int64)]
    return w.reshape(ep_size, -1).sum(axis=1).tolist()


def peak_lower_bound(loads: torch.Tensor | Sequence[float], bins: int) -> float:
    """A value the peak device load of every equal-count split of ``loads`` into ``bins`` devices reaches.

    The larger of the mean and the heaviest item plus the lightest ``n / bins - 1`` others (its device must
    hold that many more). ``mean / peak_lower_bound`` bounds the reachable balancedness from above.
    """
    w = np.sort(_as_array(loads))
    if w.size == 0:
        return 0.0
    per_bin = w.size // bins
    return max(float(w.sum()) / bins, float(w[-1] + w[: per_bin - 1].sum()))


# ---------------------------------------------------------------------------------------------------
# Packing: items with weights w into `bins` devices of equal cardinality. A packing is an int array
# [bins, n // bins] of item indices. `key` (optional) gives each item's expert id, so that copies of one
# expert are spread over different devices when possible.


def _greedy_pack(w: np.ndarray, bins: int, key: np.ndarray | None = None) -> np.ndarray:
    per_bin = len(w) // bins
    loads = [0.0] * bins
    members: list[list[int]] = [[] for _ in range(bins)]
    held: list[set[int]] = [set() for _ in range(bins)]
    weights = w.tolist()
    for item in np.argsort(-w, kind="stable").tolist():
        tag = None if key is None else int(key[item])
        best = spread_best = None
        for dev in range(bins):
            if len(members[dev]) == per_bin:
                continue
            if best is None or loads[dev] < loads[best]:
                best = dev
            if tag is not None and tag not in held[dev] and (spread_best is None or loads[dev] < loads[spread_best]):
                spread_best = dev
        dev = spread_best if spread_best is not None else best
        members[dev].append(item)
        loads[dev] += weights[item]
        if tag is not None:
            held[dev].add(tag)
    return np.array(members, dtype=np.int64)


def _differencing_pack(w: np.ndarray, bins: int, key: np.ndarray | None = None) -> np.ndarray:
    del key  # differencing merges whole rows; the swap search spreads copies afterwards
    per_bin = len(w) // bins
    ranked = np.argsort(-w, kind="stable")
    heap: list[tuple[float, int, list[tuple[float, list[int]]]]] = []
    for row in range(per_bin):
        items = ranked[row * bins : (row + 1) * bins]
        # every row starts as a partial partition with one item per device
        part = [(float(w[i]), [int(i)]) for i in items]
        heapq.heappush(heap, (-(part[0][0] - part[-1][0]), row, part))
    tiebreak = per_bin
    while len(heap) > 1:
        _, _, a = heapq.heappop(heap)
        _, _, b = heapq.heappop(heap)
        a = sorted(a, key=lambda s: -s[0])
        b = sorted(b, key=lambda s: s[0])
        merged = sorted(((sa + sb, ia + ib) for (sa, ia), (sb, ib) in zip(a, b)), key=lambda s: -s[0])
        heapq.heappush(heap, (-(merged[0][0] - merged[-1][0]), tiebreak, merged))
        tiebreak += 1
    return np.array([items for _, items in heap[0][2]], dtype=np.int64).reshape(bins, per_bin)


def _swap_search(w: np.ndarray, packing: np.ndarray, key: np.ndarray | None = None) -> np.ndarray:
    """Best-improvement pairwise swaps until no swap lowers the peak or evens out any pair of devices.

    Swapping item a (device p) with a lighter item b (device d) by delta = w[a] - w[b] leaves the pair at
    (load[p] - delta, load[d] + delta). Preferred: a swap from the peak device that brings the pair's
    larger load strictly below the peak. Otherwise, any swap with 0 < delta < load[p] - load[d] keeps
    both loads inside the old range (the peak never rises) and lowers the sum of squared loads, which
    often opens a new peak-lowering swap. Every accepted swap lowers the sum of squares, so the search
    terminates.
    """
    packing = packing.copy()
    bins = packing.shape[0]
    if bins < 2:
        return packing
    loads = w[packing].sum(axis=1)
    tol = _REL_TOL * max(float(w.sum()), 1e-300)
    floor = peak_lower_bound(w, bins)
    for _ in range(50 * packing.size):
        if loads.max() <= floor * (1 + _NEAR_OPTIMAL):
            break  # provably within _NEAR_OPTIMAL of the best possible peak
        move = None
        for finder in _MOVES:
            move = finder(w, packing, loads, key, tol)
            if move is not None:
                break
        if move is None:
            break
        src, dst, a, b = move  # item slots a (list) on device src swap with slots b on device dst
        delta = w[packing[src, a]].sum() - w[packing[dst, b]].sum()
        packing[src, a], packing[dst, b] = packing[dst, b], packing[src, a]
        loads[src] -= delta
        loads[dst] += delta
    return packing


def _clashes(packing: np.ndarray, key: np.ndarray, src: np.ndarray) -> np.ndarray:
    """[len(src), bins, m, m]: swapping src device's item i with device d's item j puts two copies together."""
    keys = key[packing]  # [bins, m]
    src_keys = keys[src]  # [s, m]
    a_on_d = (keys[None, :, None, :] == src_keys[:, None, :, None]).any(axis=3)  # [s, bins, m_a]
    b_on_src = (keys[None, :, :, None] == src_keys[:, None, None, :]).any(axis=3)  # [s, bins, m_b]
    return a_on_d[:, :, :, None] | b_on_src[:, :, None, :]


def _best_peak_swap(w, packing, loads, key, tol):
    p = int(np.argmax(loads))
    peak = loads[p]
    delta = w[packing[p]][None, :, None] - w[packing][:, None, :]  # [bins, m_a, m_b]
    pair_max = np.maximum(peak - delta, loads[:, None, None] + delta)
    bad = delta <= 0
    bad[p] = True
    if key is not None:
        bad |= _clashes(packing, key, np.array([p]))[0]
    pair_max[bad] = np.inf
    flat = int(np.argmin(pair_max))
    if not pair_max.flat[flat] < peak - tol:
        return None
    d, i, j = np.unravel_index(flat, pair_max.shape)
    return p, int(d), [int(i)], [int(j)]


def _best_peak_pair_swap(w, packing, loads, key, tol):
    """Two items of the peak device for two of another device, the pair sums closest to halving the gap."""
    bins, m = packing.shape
    if m < 2:
        return None
    p = int(np.argmax(loads))
    peak = loads[p]
    ii, jj = np.triu_indices(m, k=1)
    sums = w[packing[:, ii]] + w[packing[:, jj]]  # [bins, pairs]
    rank = np.argsort(sums, axis=1, kind="stable")
    sorted_sums = np.take_along_axis(sums, rank, axis=1)
    # a peak pair with sum s is best matched by the pair of device d whose sum is nearest s - gap_d / 2
    target = sums[p][None, :] - (peak - loads)[:, None] / 2
    pos = np.stack([np.searchsorted(row, t) for row, t in zip(sorted_sums, target)])
    last = sums.shape[1] - 1
    cand = np.stack([np.clip(pos - 1, 0, last), np.clip(pos, 0, last)], axis=-1)  # [bins, pairs, 2]
    other = np.take_along_axis(sorted_sums, cand.reshape(bins, -1), axis=1).reshape(cand.shape)
    delta = sums[p][None, :, None] - other
    pair_max = np.maximum(peak - delta, loads[:, None, None] + delta)
    pair_max[delta <= 0] = np.inf
    pair_max[p] = np.inf
    tries = np.argsort(pair_max, axis=None, kind="stable")[: 1 if key is None else 32]
    for flat in tries:
        if not pair_max.flat[flat] < peak - tol:
            return None
        d, q, c = np.unravel_index(flat, pair_max.shape)
        r = rank[d, cand[d, q, c]]
        a, b = [int(ii[q]), int(jj[q])], [int(ii[r]), int(jj[r])]
        if key is None or not _pair_clash(packing, key, p, int(d), a, b):
            return p, int(d), a, b
    return None


def _pair_clash(packing, key, p, d, a, b) -> bool:
    stay_p = np.delete(key[packing[p]], a)
    stay_d = np.delete(key[packing[d]], b)
    return bool(np.isin(key[packing[d, b]], stay_p).any() or np.isin(key[packing[p, a]], stay_d).any())


def _best_spread_swap(w, packing, loads, key, tol):
    item = w[packing]  # [bins, m]
    delta = item[:, None, :, None] - item[None, :, None, :]  # [src, dst, m_a, m_b]
    gap = (loads[:, None] - loads[None, :])[:, :, None, None]
    # new squares minus old: 2 * delta * (delta - gap); most negative is best
    gain = 2.0 * delta * (delta - gap)
    bad = (delta <= tol) | (delta >= gap - tol)
    if key is not None:
        bad |= _clashes(packing, key, np.arange(packing.shape[0]))
    gain[bad] = np.inf
    flat = int(np.argmin(gain))
    if not gain.flat[flat] < -tol * tol:
        return None
    p, d, i, j = np.unravel_index(flat, gain.shape)
    return int(p), int(d), [int(i)], [int(j)]


def _colocated(packing: np.ndarray, key: np.ndarray | None) -> int:
    if key is None:
        return 0
    keys = key[packing]
    return int(sum(len(row) - len(set(row.tolist())) for row in keys))


def _pack_full(w: np.ndarray, bins: int, key: np.ndarray | None = None) -> np.ndarray:
    best, best_score = None, None
    for start in (_greedy_pack, _differencing_pack):
        packing = _swap_search(w, start(w, bins, key), key)
        peak = float(w[packing].sum(axis=1).max())
        score = (peak, _colocated(packing, key))
        if best is None or _better(score, best_score, w):
            best, best_score = packing, score
    return best


def _better(score: tuple[float, int], than: tuple[float, int], w: np.ndarray) -> bool:
    tol = _REL_TOL * max(float(w.sum()), 1e-300)
    if score[0] < than[0] - tol:
        return True
    return abs(score[0] - than[0]) <= tol and score[1] < than[1]


_MOVES = [_best_peak_swap, _best_peak_pair_swap, _best_spread_swap]

PackFn = Callable[[np.ndarray, int, "np.ndarray | None"], np.ndarray]

# name -> packing function (weights, devices, expert id per item or None) -> [devices, items per device]
PLACEMENT_METHODS: dict[str, PackFn] = {
    "greedy": _greedy_pack,  # DeepSeek EPLB balanced packing only: the baseline
    "full": _pack_full,  # greedy and differencing starts, each refined by swap search; the better one
}


def _get_method(name: str) -> PackFn:
    if name not in PLACEMENT_METHODS:
        raise ValueError(f"unknown placement method {name!r}; known methods: {sorted(PLACEMENT_METHODS)}")
    return PLACEMENT_METHODS[name]


# ---------------------------------------------------------------------------------------------------
# Per-layer planning


def _match_devices(packing: np.ndarray, home: np.ndarray) -> np.ndarray:
    """Reorder the packing's rows so each lands on the device already holding most of its items.

    Devices are interchangeable, so this changes no load; it only moves fewer experts (greedy matching on
    overlap, ties to the lowest device). ``home[item]`` is the item's current device.
    """
    bins = packing.shape[0]
    overlap = np.zeros((bins, bins), dtype=np.int64)  # [row, device]
    np.add.at(overlap, (np.repeat(np.arange(bins), packing.shape[1]), home[packing].reshape(-1)), 1)
    placed = np.full(bins, -1, dtype=np.int64)  # device -> row
    free_rows, free_devs = np.ones(bins, dtype=bool), np.ones(bins, dtype=bool)
    for flat in np.argsort(-overlap, axis=None, kind="stable"):
        row, dev = divmod(int(flat), bins)
        if free_rows[row] and free_devs[dev]:
            placed[dev] = row
            free_rows[row] = free_devs[dev] = False
    return packing[placed]


def _settle_ties(w: np.ndarray, packing: np.ndarray, home: np.ndarray) -> np.ndarray:
    """Among experts of exactly equal load (interchangeable for balance), put as many as possible at home.

    For each load value, every slot it occupies first takes an expert of that value whose home is the slot's
    device; the rest fill the remaining slots. Device loads do not change.
    """
    flat = packing.reshape(-1).copy()
    slot_dev = np.arange(flat.size) // packing.shape[1]
    _, value_of_slot, counts = np.unique(w[flat], return_inverse=True, return_counts=True)
    for value in np.flatnonzero(counts > 1):
        slots = np.flatnonzero(value_of_slot == value)
        waiting: dict[int, list[int]] = {}
        for item in sorted(flat[slots].tolist()):
            waiting.setdefault(int(home[item]), []).append(item)
        placed = {}
        for slot in slots.tolist():
            if waiting.get(int(slot_dev[slot])):
                placed[slot] = waiting[int(slot_dev[slot])].pop(0)
        rest = sorted(item for items in waiting.values() for item in items)
        for slot in slots.tolist():
            flat[slot] = placed[slot] if slot in placed else rest.pop(0)
    return flat.reshape(packing.shape)


def _packing_to_order(w: np.ndarray, packing: np.ndarray) -> list[int]:
    """Items of device 0, then device 1, ...: blocks matched to devices, ties swapped home, sorted inside."""
    home = np.arange(packing.size) // packing.shape[1]
    packing = _settle_ties(w, _match_devices(packing, home), home)
    return np.sort(packing, axis=1).reshape(-1).tolist()


def _plan_order(w: np.ndarray, ep_size: int, num_groups: int, pack: PackFn, layer: int) -> list[int]:
    """A permutation of the layer's experts whose contiguous ``ep_size`` blocks balance the load."""
    n = len(w)
    identity = list(range(n))
    if num_groups == 1:
        order = _packing_to_order(w, pack(w, ep_size, None))
    else:
        group_size, per_device = n // num_groups, n // ep_size
        if per_device % group_size == 0:
            # every device holds whole groups: balance group sums, keep each group's inner order
            group_loads = w.reshape(num_groups, group_size).sum(axis=1)
            groups = _packing_to_order(group_loads, pack(group_loads, ep_size, None))
            order = [g * group_size + i for g in groups for i in range(group_size)]
        elif group_size % per_device == 0:
            # every group spans whole devices: which devices a group lands on does not change the peak
            order = []
            for g in range(num_groups):
                w_g = w[g * group_size : (g + 1) * group_size]
                inner = _packing_to_order(w_g, pack(w_g, group_size // per_device, None))
                order.extend(g * group_size + i for i in inner)
        else:
            raise ValueError(
                f"layer {layer}: with num_groups={num_groups} ({group_size} experts per group) and ep_size={ep_size} "
                f"({per_device} experts per device) a device neither holds whole groups nor does a group span whole "
                "devices; group-limited routing cannot be kept. Use an ep_size that divides or is a multiple of "
                "num_groups"
            )
    before = max(device_loads(w, ep_size))
    after = max(device_loads(w, ep_size, order))
    if after < before - _REL_TOL * max(float(w.sum()), 1e-300):
        return order
    return identity


def _replica_counts(w: np.ndarray, num_redundant: int, ep_size: int) -> np.ndarray:
    """Each extra slot to the expert with the highest load per copy (DeepSeek EPLB).

    An expert gets at most ``ep_size`` copies while any other can take one: a copy beyond that must share a
    device with another copy of it, which takes a slot and moves no load.
    """
    counts = np.ones(len(w), dtype=np.int64)
    # (-load per copy, expert): ties go to the lowest expert id
    heap = [(-float(x), e) for e, x in enumerate(w)]
    heapq.heapify(heap)
    capped: list[tuple[float, int]] = []
    cap = ep_size
    for _ in range(num_redundant):
        if not heap:  # every expert is on every device: from here on copies only split slots
            heap, capped, cap = capped, [], num_redundant + 1
            heapq.heapify(heap)
        _, e = heapq.heappop(heap)
        counts[e] += 1
        entry = (-float(w[e]) / counts[e], e)
        heapq.heappush(capped if counts[e] >= cap else heap, entry)
    return counts


@dataclass
class _Replicated:
    physical_to_logical: list[int]
    replica_count: list[int]
    device_loads: list[float]


def _plan_replicas(
    w: np.ndarray, ep_size: int, num_redundant: int, pack: PackFn, order: list[int] | None
) -> _Replicated:
    n = len(w)
    counts = _replica_counts(w, num_redundant, ep_size)
    key = np.repeat(np.arange(n), counts)
    copy_load = (w / counts)[key]
    packing = pack(copy_load, ep_size, key)
    # vLLM's initial layout puts logical expert e in physical slot e
    home = np.arange(len(key)) // (len(key) // ep_size)
    candidate = np.sort(key[_match_devices(packing, home[key])], axis=1)  # a device's slots by logical id
    cand_counts = counts
    if order is not None:
        # Fallback that can never be worse than the plan without replicas: that plan with each
        # device's extra slots filled by copies of experts it already holds (their load stays put).
        fallback, fb_counts = _colocated_fallback(w, ep_size, num_redundant, order)
        fb_loads = _replicated_loads(w, fallback, fb_counts)
        cand_loads = _replicated_loads(w, candidate, cand_counts)
        if max(fb_loads) < max(cand_loads) - _REL_TOL * max(float(w.sum()), 1e-300):
            logger.debug("replicas do not beat the plan without them; keeping it with co-located copies")
            candidate, cand_counts = fallback, fb_counts
    return _Replicated(
        physical_to_logical=candidate.reshape(-1).tolist(),
        replica_count=cand_counts.tolist(),
        device_loads=_replicated_loads(w, candidate, cand_counts),
    )


def _colocated_fallback(
    w: np.ndarray, ep_size: int, num_redundant: int, order: list[int]
) -> tuple[np.ndarray, np.ndarray]:
    blocks = np.asarray(order, dtype=np.int64).reshape(ep_size, -1)
    extra = num_redundant // ep_size  # whole, since experts and experts + num_redundant divide by ep_size
    # copies of a device's own experts, heaviest first (any choice leaves its load unchanged)
    heavy = np.take_along_axis(blocks, np.argsort(-w[blocks], axis=1, kind="stable"), axis=1)
    repeats = -(-extra // blocks.shape[1])
    reps = np.concatenate([blocks, np.tile(heavy, (1, repeats))[:, :extra]], axis=1)
    counts = np.bincount(reps.reshape(-1), minlength=len(w))
    return np.sort(reps, axis=1), counts


def _replicated_loads(w: np.ndarray, physical: np.ndarray, counts: np.ndarray) -> list[float]:
    return (w / counts)[physical].sum(axis=1).tolist()


# ---------------------------------------------------------------------------------------------------
# Public API


@dataclass
class PlacementPlan:
    """Per-layer expert placement for ``ep_size`` devices; every list has one entry per planned layer.

    ``order[i]`` is the permutation for ``permute_experts`` (``None`` when layer i's expert count is not
    divisible by ``ep_size``, possible only with replicas). The ``*_replicated`` and map fields are set
    when ``num_redundant > 0``; they number experts as ``loads`` did (see ``for_permuted_checkpoint``).
    """

    ep_size: int
    num_redundant: int
    method: str
    num_groups: int
    layer_ids: list[int]
    num_experts: list[int]
    order: list[list[int] | None]
    device_loads_before: list[list[float] | None]
    device_loads_after: list[list[float] | None]
    balancedness_before: list[float | None]
    balancedness_after: list[float | None]
    physical_to_logical: list[list[int]] | None = None
    replica_count: list[list[int]] | None = None
    device_loads_replicated: list[list[float]] | None = None
    balancedness_replicated: list[float] | None = None

    def orders_by_layer(self, skip_identity: bool = True) -> dict[int, list[int]]:
        """``{layer index: order}`` ready for ``hf_moeprune.permute_experts(model, ...)``."""
        out = {}
        for layer, order in zip(self.layer_ids, self.order):
            if order is None or (skip_identity and order == list(range(len(order)))):
                continue
            out[layer] = order
        return out

    def for_permuted_checkpoint(self) -> PlacementPlan:
        """This plan with its replica maps in the expert numbering after ``permute_experts`` applied ``order``.

        The maps are planned on the loads' numbering; once a checkpoint is saved in ``order``, its expert
        ``i`` is the old expert ``order[i]``, and an engine reading the permuted checkpoint needs these maps.
        """
        if self.physical_to_logical is None:
            return replace(self)
        phys, counts = [], []
        for order, old_phys, old_counts in zip(self.order, self.physical_to_logical, self.replica_count):
            if order is None:
                phys.append(list(old_phys))
                counts.append(list(old_counts))
                continue
            new_id = np.argsort(np.asarray(order))
            phys.append(new_id[np.asarray(old_phys)].tolist())
            counts.append(np.asarray(old_counts)[np.asarray(order)].tolist())
        return replace(self, physical_to_logical=phys, replica_count=counts)

    def _uniform_experts(self, what: str) -> int:
        if self.physical_to_logical is None:
            raise ValueError(f"{what} needs replicas: plan again with num_redundant > 0")
        if len(set(self.num_experts)) != 1:
            raise ValueError(
                f"{what} is a dense tensor and needs the same expert count in every layer, got {self.num_experts}; "
                "use the per-layer lists physical_to_logical / replica_count instead"
            )
        return self.num_experts[0]

    @property
    def physical_to_logical_map(self) -> torch.Tensor:
        """vLLM layout: ``[layers, experts + num_redundant]``, physical slot -> logical expert id."""
        self._uniform_experts("physical_to_logical_map")
        return torch.tensor(self.physical_to_logical, dtype=torch.long)

    @property
    def logical_replica_count(self) -> torch.Tensor:
        """vLLM layout: ``[layers, experts]``, number of physical copies of each logical expert."""
        self._uniform_experts("logical_replica_count")
        return torch.tensor(self.replica_count, dtype=torch.long)

    @property
    def logical_to_physical_map(self) -> torch.Tensor:
        """vLLM layout: ``[layers, experts, num_redundant + 1]``, physical slots of each expert, -1 padded."""
        experts = self._uniform_experts("logical_to_physical_map")
        out = torch.full((len(self.layer_ids), experts, self.num_redundant + 1), -1, dtype=torch.long)
        for layer, phys in enumerate(self.physical_to_logical):
            filled = [0] * experts
            for slot, logical in enumerate(phys):
                out[layer, logical, filled[logical]] = slot
                filled[logical] += 1
        return out

    def summary(self) -> dict[str, float | None]:
        def mean(values):
            values = [v for v in values or [] if v is not None]
            return sum(values) / len(values) if values else None

        def worst(values):
            values = [v for v in values or [] if v is not None]
            return min(values) if values else None

        return {
            "mean_balancedness_before": mean(self.balancedness_before),
            "mean_balancedness_after": mean(self.balancedness_after),
            "mean_balancedness_replicated": mean(self.balancedness_replicated),
            "min_balancedness_before": worst(self.balancedness_before),
            "min_balancedness_after": worst(self.balancedness_after),
            "min_balancedness_replicated": worst(self.balancedness_replicated),
        }

    def to_dict(self) -> dict:
        """JSON-serialisable: every field plus ``summary``."""
        return {**asdict(self), "summary": self.summary()}


def _layer_loads(
    loads: torch.Tensor | Sequence[torch.Tensor] | Mapping[int, torch.Tensor],
) -> tuple[list[int], list[np.ndarray]]:
    if isinstance(loads, np.ndarray):
        loads = torch.from_numpy(np.asarray(loads, dtype=np.float64))
    if isinstance(loads, Mapping):
        layer_ids = [int(k) for k in loads]
        rows = list(loads.values())
    elif isinstance(loads, torch.Tensor):
        if loads.dim() != 2:
            raise ValueError(
                f"loads tensor has shape {tuple(loads.shape)}; expected [layers, experts] "
                "(or pass a list of 1-D tensors when layers have different expert counts)"
            )
        layer_ids, rows = list(range(loads.shape[0])), list(loads)
    elif isinstance(loads, Sequence) and not isinstance(loads, str):
        layer_ids, rows = list(range(len(loads))), list(loads)
    else:
        raise ValueError(
            f"loads of type {type(loads).__name__}; expected a [layers, experts] tensor or array, "
            "a list of 1-D tensors or a dict {layer: 1-D tensor}"
        )
    if not rows:
        raise ValueError("loads is empty: give at least one layer")
    out = []
    for layer, row in zip(layer_ids, rows):
        arr = _as_array(row)
        if arr.ndim != 1 or arr.size == 0:
            raise ValueError(f"layer {layer}: loads must be a non-empty 1-D vector, got shape {arr.shape}")
        if not np.isfinite(arr).all():
            bad = np.flatnonzero(~np.isfinite(arr)).tolist()
            raise ValueError(f"layer {layer}: loads must be finite, got {arr[bad].tolist()} at experts {bad}")
        if (arr < 0).any():
            neg = np.flatnonzero(arr < 0).tolist()
            raise ValueError(f"layer {layer}: loads must be >= 0, got {arr[neg].tolist()} at experts {neg}")
        out.append(arr)
    return layer_ids, out


def _check_int(name: str, value, minimum: int) -> int:
    try:
        if isinstance(value, bool):
            raise TypeError
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"{name}={value!r}; expected an integer >= {minimum}") from None
    if value < minimum:
        raise ValueError(f"{name}={value!r}; expected an integer >= {minimum}")
    return value


def plan_placement(
    loads: torch.Tensor | Sequence[torch.Tensor] | Mapping[int, torch.Tensor],
    ep_size: int,
    num_redundant: int = 0,
    method: str = "full",
    num_groups: int = 1,
) -> PlacementPlan:
    """Plan, per layer, an expert order (and optionally replicas) that balances load over ``ep_size`` devices.

    Args:
        loads: per-expert load, see the module docstring for accepted layouts.
        ep_size: number of expert-parallel devices.
        num_redundant: extra physical expert slots per layer for engines with replicas (vLLM EPLB).
        method: a key of ``PLACEMENT_METHODS`` (``"full"``, or ``"greedy"`` for the EPLB baseline).
        num_groups: group-limited routing groups per layer (DeepSeek-V3 ``n_group``); 1 for none.
    """
    pack = _get_method(method)
    ep_size = _check_int("ep_size", ep_size, 1)
    num_redundant = _check_int("num_redundant", num_redundant, 0)
    num_groups = _check_int("num_groups", num_groups, 1)
    layer_ids, rows = _layer_loads(loads)
    for layer, w in zip(layer_ids, rows):
        n = len(w)
        if num_redundant == 0 and n % ep_size:
            raise ValueError(
                f"layer {layer}: {n} experts is not divisible by ep_size={ep_size}; each device must hold "
                f"the same number of experts (choose an ep_size dividing {n}, or add replicas so that "
                "experts + num_redundant is divisible)"
            )
        if num_redundant and (n + num_redundant) % ep_size:
            raise ValueError(
                f"layer {layer}: {n} experts + num_redundant={num_redundant} = {n + num_redundant} physical slots "
                f"is not divisible by ep_size={ep_size}"
            )
        if n % num_groups:
            raise ValueError(f"layer {layer}: {n} experts is not divisible by num_groups={num_groups}")

    plan = PlacementPlan(
        ep_size=ep_size,
        num_redundant=num_redundant,
        method=method,
        num_groups=num_groups,
        layer_ids=layer_ids,
        num_experts=[len(w) for w in rows],
        order=[],
        device_loads_before=[],
        device_loads_after=[],
        balancedness_before=[],
        balancedness_after=[],
    )
    if num_redundant:
        plan.physical_to_logical, plan.replica_count = [], []
        plan.device_loads_replicated, plan.balancedness_replicated = [], []
    progress = tqdm(zip(layer_ids, rows), total=len(rows), desc="planning expert placement", disable=None, leave=False)
    for layer, w in progress:
        order = None
        if len(w) % ep_size == 0:
            order = _plan_order(w, ep_size, num_groups, pack, layer)
            before, after = device_loads(w, ep_size), device_loads(w, ep_size, order)
            plan.device_loads_before.append(before)
            plan.device_loads_after.append(after)
            plan.balancedness_before.append(balancedness(before))
            plan.balancedness_after.append(balancedness(after))
        else:
            for values in (plan.device_loads_before, plan.device_loads_after):
                values.append(None)
            plan.balancedness_before.append(None)
            plan.balancedness_after.append(None)
        plan.order.append(order)
        if num_redundant:
            rep = _plan_replicas(w, ep_size, num_redundant, pack, order)
            plan.physical_to_logical.append(rep.physical_to_logical)
            plan.replica_count.append(rep.replica_count)
            plan.device_loads_replicated.append(rep.device_loads)
            plan.balancedness_replicated.append(balancedness(rep.device_loads))
    logger.info("placement (%s) for ep_size=%d over %d layers: %s", method, ep_size, len(layer_ids), plan.summary())
    return plan

"""Saved loader positions: the JSON form of one logical worker's state, and redistribution to another layout.

A *unit* is a piece of one epoch's sample stream of a worker slot, as plain JSON:

    {"shards": [g, ...], "from": m | None, "extra": [i, ...], "mod": M, "res": r, "j": j0}

``g`` indexes the sorted shard list of ``data.path`` (the same at every layout);
in the first shard the members ``>= from`` are read (none when ``from`` is None)
plus the explicitly named ``extra`` members below it; later shards are read
whole. With ``mod > 0`` a member is taken only if the running counter ``j``
(starting at ``j0``, counting every member read from ``from`` on) satisfies
``j % mod == res``: that is how a slot takes single samples when there are
fewer shards than slots. An epoch of a slot is a list of units: normally one
unit per shard it is dealt (or one counter unit over all shards); after a
redistribution, the units it was dealt from what the old run left unread.

A *worker state* says where one logical worker stands after the last batch it
produced: epoch, unit, shard and member position, the shuffle buffer and the
sample in hand as references ``(g, member)`` re-read on restore (no latent is
stored), the packer's pending documents (token ids stored, latents re-read),
the two rng states (base64 of the Mersenne-Twister words), the text-only
stream's position, and the units of redistributed epochs still ahead (``pool``).

Redistribution: for every epoch some old slot has not finished, the samples no
old slot has consumed (unread units, shuffle buffers, samples in hand, pending
packer documents: those are not consumed) are merged per shard and dealt
round-robin over the new slots. Every such epoch is then covered exactly once
over old and new runs together; the epochs after follow the new layout.
Pending text-only documents are dropped and the text stream restarts at the
new slot's epoch start: text-only data is cycled, it has no epoch to keep.
"""

from __future__ import annotations

import base64
import json
import os
import random
import zlib
from collections import defaultdict

import numpy as np

FORMAT = 1


class DataOrderWarning(UserWarning):
    """A resume under another loader layout: the batch order differs from the uninterrupted run's."""


# ---------------------------------------------------------------- seeds (one place, the loader's order)
def shard_order(seed: int, epoch: int, n: int) -> list[int]:
    """Indices of the sorted shard list in epoch order; the same on every rank and at every layout."""
    order = list(range(n))
    random.Random(seed * 7919 + epoch).shuffle(order)
    return order


def shuffle_rng(seed: int, epoch: int, slot: int) -> random.Random:
    return random.Random((seed * 1_000_003 + epoch) * 65_537 + slot)


def pack_rng(seed: int, epoch: int, slot: int) -> random.Random:
    return random.Random((seed * 31 + epoch) * 65_537 + slot)


def text_order_rng(seed: int, epoch: int, cycle: int) -> random.Random:
    return random.Random(seed * 104_729 + epoch * 1009 + cycle)


def shards_crc(urls: list[str]) -> int:
    """Fingerprint of the shard list (file names: the data may move): a state read against other data is
    refused, not misread."""
    return zlib.crc32("\n".join(os.path.basename(u) for u in urls).encode("utf-8"))


# ---------------------------------------------------------------- rng codec
def encode_rng(rng: random.Random) -> dict:
    version, words, gauss = rng.getstate()
    return {"v": version, "mt": base64.b64encode(np.asarray(words, dtype="<u4").tobytes()).decode("ascii"), "g": gauss}


def decode_rng(data: dict) -> random.Random:
    words = tuple(int(w) for w in np.frombuffer(base64.b64decode(data["mt"]), dtype="<u4"))
    rng = random.Random()
    rng.setstate((data["v"], words, data["g"]))
    return rng


# ---------------------------------------------------------------- units
def make_unit(shards: list[int], frm: int | None = 0, extra=(), mod: int = 0, res: int = 0, j: int = 0) -> dict:
    return {"shards": list(shards), "from": frm, "extra": sorted(extra), "mod": mod, "res": res, "j": j}


def normal_units(seed: int, epoch: int, slot: int, slots: int, n: int) -> list[dict]:
    """A slot's epoch in the normal layout: its shards round-robin, or single samples when shards < slots."""
    order = shard_order(seed, epoch, n)
    if n >= slots:
        return [make_unit([g]) for g in order[slot::slots]]
    return [make_unit(order, mod=slots, res=slot)]


def unit_rest(unit: dict, q: int, i: int, j: int) -> dict | None:
    """What of ``unit`` is unread at position (shard q of it, next member i, counter j); None if nothing."""
    if q > 0:
        return make_unit(unit["shards"][q:], i, (), unit["mod"], unit["res"], j)
    frm = None if unit["from"] is None else max(unit["from"], i)
    extra = [x for x in unit["extra"] if x >= i]
    if frm is None and not extra and len(unit["shards"]) == 1:
        return None
    return make_unit(unit["shards"], frm, extra, unit["mod"], unit["res"], j)


def merge_units(units: list[dict]) -> list[dict]:
    """One unit per shard for whole-member units of one shard (buffers + unread rests); others kept."""
    per_shard: dict[int, list[dict]] = defaultdict(list)
    out = []
    for u in units:
        if len(u["shards"]) == 1 and u["mod"] == 0:
            per_shard[u["shards"][0]].append(u)
        else:
            out.append(u)
    for g, group in per_shard.items():
        froms = [u["from"] for u in group if u["from"] is not None]
        frm = min(froms) if froms else None
        extra = {x for u in group for x in u["extra"] if frm is None or x < frm}
        out.append(make_unit([g], frm, extra))
    return out


# ---------------------------------------------------------------- worker states
def fresh_state(slot: int, slots: int, worker: int) -> dict:
    """A worker before its first batch: epoch 0 not begun, nothing read."""
    return {
        "worker": worker,
        "slot": slot,
        "slots": slots,
        "epoch": 0,
        "fresh": True,
        "pool": [],
        "unit": 0,
        "q": 0,
        "i": 0,
        "j": 0,
        "seen": 0,
        "skipped": 0,
        "batches": 0,
        "buffer": [],
        "in_hand": None,
        "shuffle_rng": None,
        "pack_rng": None,
        "packer": {"rows": [], "current": [], "used": 0},
        "text": None,
    }


def units_for(pool: dict[int, list[dict]], epoch: int, seed: int, slot: int, slots: int, n: int) -> list[dict]:
    """A slot's units of ``epoch``: dealt ones for redistributed epochs (``pool``), else the normal layout's."""
    if epoch in pool:
        return pool[epoch]
    if pool and epoch <= max(pool):
        return []
    return normal_units(seed, epoch, slot, slots, n)


def _units_of(state: dict, epoch: int, seed: int, n: int) -> list[dict]:
    return units_for({e: u for e, u in state["pool"]}, epoch, seed, state["slot"], state["slots"], n)


def last_planned_epoch(state: dict) -> int:
    return max([state["epoch"], *(e for e, _ in state["pool"])])


def remaining(state: dict, seed: int, n: int, until: int) -> dict[int, list[dict]]:
    """Per epoch up to ``until``: the units holding what this worker has not consumed (its unread rest,
    its shuffle buffer, its sample in hand, its pending packer documents)."""
    out: dict[int, list[dict]] = defaultdict(list)
    epoch = state["epoch"]
    units = _units_of(state, epoch, seed, n)
    if state["fresh"]:
        out[epoch] += units
    elif state["unit"] < len(units):
        rest = unit_rest(units[state["unit"]], state["q"], state["i"], state["j"])
        out[epoch] += ([rest] if rest else []) + units[state["unit"] + 1 :]
    refs: dict[tuple[int, int], list[int]] = defaultdict(list)  # (epoch, shard) -> members
    flat = state["buffer"]
    for k in range(0, len(flat), 2):
        refs[(epoch, flat[k])].append(flat[k + 1])
    if state["in_hand"] is not None:
        refs[(epoch, state["in_hand"][0])].append(state["in_hand"][1])
    for row in [*state["packer"]["rows"], state["packer"]["current"]]:
        for doc in row:
            if doc.get("ref") is not None:
                refs[(doc["e"], doc["ref"][0])].append(doc["ref"][1])
    for (e, g), members in refs.items():
        out[e].append(make_unit([g], None, members))
    for e in range(epoch + 1, until + 1):
        out[e] += _units_of(state, e, seed, n)
    return out


def redistribute(old: list[dict], seed: int, n: int, new_slots: int, old_seed: int) -> list[dict]:
    """Fresh worker states for all ``new_slots`` slots that deal over them what the old worker states
    (all of them, of every old DP rank) left unconsumed, epoch by epoch; later epochs: the new layout."""
    until = max(last_planned_epoch(s) for s in old)
    per_epoch: dict[int, list[dict]] = defaultdict(list)
    for s in old:
        for e, units in remaining(s, old_seed, n, until).items():
            per_epoch[e] += units
    lo = min((e for e, units in per_epoch.items() if units), default=until + 1)
    dealt: list[list] = [[] for _ in range(new_slots)]
    for e in range(lo, until + 1):
        units = sorted(merge_units(per_epoch.get(e, [])), key=lambda u: json.dumps(u, sort_keys=True))
        random.Random(seed * 7_368_787 + e).shuffle(units)
        for k in range(new_slots):
            dealt[k].append([e, units[k::new_slots]])
    out = []
    for k in range(new_slots):
        st = fresh_state(k, new_slots, 0)
        st["epoch"] = lo
        st["pool"] = dealt[k]
        out.append(st)
    return out


def pending_epochs(state: dict) -> set[int]:
    """Epochs of the image documents still pending in this worker's packer (not yet in a batch)."""
    return {d["e"] for row in [*state["packer"]["rows"], state["packer"]["current"]] for d in row if "e" in d}

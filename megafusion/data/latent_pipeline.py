"""The Ray side of latent caching: encoder actors, shard scheduling, progress, the summary.

Runs the same way locally (a local Ray started here), inside ``ray job submit``
(``RAY_ADDRESS`` is set: connect to that cluster) and on a cluster brought up
with ``ray up``/``ray submit`` (``--address auto``). Encoder actors take one GPU
each when the cluster has GPUs, one CPU otherwise; shards are the units of work.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from megafusion.data.latent_cache import CacheOptions, done_record, expand_inputs
from megafusion.durable import write_text

MANIFEST = "manifest.json"
SUMMARY = "summary.json"


class EncoderWorker:
    """Holds one VAE; encodes whole shards. Wrapped with ``ray.remote`` by :func:`run`."""

    def __init__(self, vae_dir: str, opts: dict, crash_after: int | None = None, crash_shard: str | None = None):
        import torch

        from megafusion.data.latent_cache import load_vae

        if not torch.cuda.is_available():
            torch.set_num_threads(1)  # one CPU per actor
        self.device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        self.vae = load_vae(vae_dir, self.device)
        self.opts = CacheOptions(**opts)
        self.crash_after, self.crash_shard = crash_after, crash_shard

    def process(self, in_url: str, out_path: str) -> dict:
        """Encode one shard; the record also names the Ray node that did it (``node_id``, ``node_ip``), so a
        multi-node run can show where its actors ran (logged per shard and counted in the summary)."""
        import ray

        from megafusion.data.latent_cache import process_shard

        crash = self.crash_after if self.crash_shard in (None, Path(out_path).name) else None
        rec = process_shard(self.vae, in_url, Path(out_path), self.opts, crash)
        node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
        return {**rec, "node_id": node_id, "node_ip": ray.util.get_node_ip_address() if node_id else ""}


def expand_all(inputs: str | Sequence[str]) -> list[str]:
    """Every shard of one pattern or of several (``--input`` takes several values: ``ray submit`` runs the tool
    through the head's login shell, which expands a brace pattern or glob into many arguments); in the given
    order, each shard once, so that listing a shard twice cannot encode it twice."""
    patterns = [inputs] if isinstance(inputs, str) else list(inputs)
    if not patterns:
        raise FileNotFoundError("--input: no shard pattern given")
    return list(dict.fromkeys(url for pattern in patterns for url in expand_inputs(pattern)))


def _vae_fingerprint(vae_dir: str) -> str:
    cfg = Path(vae_dir) / "config.json"
    if not cfg.is_file():
        raise FileNotFoundError(f"--vae {vae_dir!r}: no config.json (expected a diffusers AutoencoderKL directory)")
    return hashlib.sha256(cfg.read_bytes()).hexdigest()[:16]


SETTING_DEFAULTS = {"keep_pixels": 0, "edit": False}
"""Settings added after manifests were first written, at the value those runs used."""


def plan(inputs: list[str], out_dir: Path, settings: dict) -> list[tuple[str, Path]]:
    """Input shard -> output shard, fixed by a manifest so reruns map shards identically.

    The manifest also pins the encoding settings (resolution, sampling, seed, VAE config
    hash): a rerun with other settings would mix two kinds of latents and is refused.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    pairs = [(url, out_dir / f"latents-{i:06d}.tar") for i, url in enumerate(inputs)]
    manifest = out_dir / MANIFEST
    mapping = {str(p.name): url for url, p in pairs}
    if manifest.is_file():
        old = json.loads(manifest.read_text())
        if old["shards"] != mapping:
            raise ValueError(
                f"{manifest} was written for different inputs ({len(old['shards'])} shards); "
                "use a new --output directory for a different --input"
            )
        saved = {**SETTING_DEFAULTS, **old.get("settings", {})}  # manifests older than a setting had its default
        diff = {k: (saved.get(k), v) for k, v in settings.items() if saved.get(k) != v}
        if diff:
            raise ValueError(
                f"{manifest} was written with other settings {diff} (saved, now); "
                "use a new --output directory or the same settings"
            )
    else:
        write_text(manifest, json.dumps({"shards": mapping, "settings": settings}, indent=1, sort_keys=True))
    return pairs


def summarize(out_dir: Path, seconds: float, this_run: int, nodes: dict | None = None) -> dict:
    """Totals over every completion record (all runs), plus this run's time, shard count and, per Ray node
    (``node_ip node_id``), the shards its actors encoded in this run."""
    totals: dict = {"shards_done": 0, "in": 0, "out": 0, "skipped": {}}
    for rec_path in sorted(out_dir.glob("*.done.json")):
        rec = json.loads(rec_path.read_text())
        totals["shards_done"] += 1
        totals["in"] += rec.get("in", 0)
        totals["out"] += rec.get("out", 0)
        for k, v in rec.items():
            if k.startswith("skipped/"):
                reason = k.split("/", 1)[1]
                totals["skipped"][reason] = totals["skipped"].get(reason, 0) + v
    totals["shards_total"] = len(json.loads((out_dir / MANIFEST).read_text())["shards"])
    totals["seconds_this_run"] = round(seconds, 2)
    totals["shards_this_run"] = this_run
    totals["nodes_this_run"] = dict(sorted((nodes or {}).items()))
    write_text(out_dir / SUMMARY, json.dumps(totals, indent=1, sort_keys=True))
    return totals


def run(
    input_pattern: str | Sequence[str],
    output: str,
    vae_dir: str,
    opts: CacheOptions,
    num_workers: int,
    address: str | None = None,
    max_retries: int = 1,
    crash_after: int | None = None,
    log=print,
    crash_shard: str | None = None,
) -> dict:
    """Encode every not-yet-done shard; returns the summary. Raises if shards still failed after retries."""
    import ray
    from tqdm import tqdm

    out_dir = Path(output).resolve()
    settings = {
        "resolution": opts.resolution,
        "sample": opts.sample,
        "seed": opts.seed,
        "min_size": opts.min_size,
        "max_pixels": opts.max_pixels,
        "vae_config": _vae_fingerprint(vae_dir),
        "keep_pixels": opts.keep_pixels,  # a rerun with another --keep-pixels must not pass for done
        "edit": opts.edit,
    }
    pairs = plan(expand_all(input_pattern), out_dir, settings)
    todo = [(u, p) for u, p in pairs if not done_record(p).is_file()]
    log(f"[precompute] {len(pairs)} input shards, {len(pairs) - len(todo)} already done, {len(todo)} to encode")
    t0 = time.time()
    if not todo:
        return summarize(out_dir, 0.0, 0)

    if not ray.is_initialized():
        if address or os.environ.get("RAY_ADDRESS"):
            ray.init(address=address or None, log_to_driver=False)
        else:
            # address="local": a fresh local instance even if a `ray start` cluster runs on this machine
            ray.init(address="local", num_cpus=max(num_workers, 1), include_dashboard=False, log_to_driver=False)
    res = ray.cluster_resources()
    gpus, cpus = int(res.get("GPU", 0)), int(res.get("CPU", 1))
    resources = {"num_gpus": 1} if gpus >= 1 else {"num_cpus": 1}
    capacity = gpus if gpus >= 1 else max(1, cpus)  # more actors than fit would wait forever
    n = max(1, min(num_workers, len(todo), capacity))
    if n < num_workers:
        log(
            f"[precompute] using {n} encoder actor(s): --num-workers {num_workers} but the cluster holds "
            f"{capacity} {'GPU' if gpus else 'CPU'} actor(s) and {len(todo)} shard(s) are left"
        )
    Remote = ray.remote(EncoderWorker)
    opts_d = asdict(opts)

    def new_actor():
        # SPREAD: on a multi-node cluster the actors go to different nodes instead of filling the driver's first
        # (Ray's default packs CPU actors onto one node while it has room); a replacement goes where room is
        return Remote.options(scheduling_strategy="SPREAD", **resources).remote(
            vae_dir, opts_d, crash_after, crash_shard
        )

    idle = [new_actor() for _ in range(n)]
    queue = list(todo)
    attempts: dict[str, int] = {}
    running: dict = {}
    failed: list[str] = []
    images = 0
    nodes: dict[str, int] = {}  # "node_ip node_id" -> shards encoded there in this run
    bar = tqdm(total=len(todo), unit="shard", desc="encoding", disable=None)
    while queue or running:
        while queue and idle:
            url, out = queue.pop(0)
            actor = idle.pop()
            running[actor.process.remote(url, str(out))] = (actor, url, out)
        ready, _ = ray.wait(list(running), num_returns=1)
        ref = ready[0]
        actor, url, out = running.pop(ref)
        try:
            rec = ray.get(ref)
            images += rec.get("out", 0)
            where = f"{rec.get('node_ip', '')} {rec.get('node_id', '')}".strip()
            nodes[where] = nodes.get(where, 0) + 1
            log(f"[precompute] {out.name} encoded on node {where}")
            idle.append(actor)
            bar.update(1)
            bar.set_postfix(images_per_s=f"{images / max(time.time() - t0, 1e-6):.1f}")
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as exc:
            # the worker died, or the shard raised (e.g. an I/O error): the shard is redone
            died = isinstance(exc, ray.exceptions.RayActorError)
            attempts[url] = attempts.get(url, 0) + 1
            cause = str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else type(exc).__name__
            log(
                f"[precompute] {'worker died' if died else 'error'} while encoding {url} "
                f"(attempt {attempts[url]}): {cause}"
            )
            if attempts[url] <= max_retries:
                queue.append((url, out))
            else:
                failed.append(url)
            idle.append(new_actor() if died else actor)
    bar.close()
    summary = summarize(out_dir, time.time() - t0, len(todo) - len(failed), nodes)
    log(
        f"[precompute] done: {summary['out']} latents from {summary['in']} samples, skipped {summary['skipped']}, "
        f"{images / max(time.time() - t0, 1e-6):.1f} images/s this run; summary {out_dir / SUMMARY}"
    )
    if failed:
        raise RuntimeError(
            f"{len(failed)} shard(s) failed after {max_retries} retries ({failed[:3]}); "
            "rerun the same command to redo them"
        )
    return summary

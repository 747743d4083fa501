"""Resharding throughput and memory: tools/reshard_checkpoint.py against a plain copy of the same bytes.

    python benchmarks/bench_reshard.py [--hidden 1024] [--layers 8] [--repeats 2]

1. Writes a random HF Llama of the given size and trains it one step at TP=2 with the real
   launcher (torchrun, 2 gloo ranks), which saves a checkpoint with ZeRO optimizer state.
2. Side by side, on the same disk, from the page cache alike:
     copy    : shutil.copyfile of every file of the checkpoint, each fsynced
     reshard : TP=2 -> TP=1 (DP=2), in a fresh process (sha256 of every input and output
               file, unshard, re-cut, write, fsync)
   Prints GB/s of each (checkpoint bytes / seconds) and the ratio (target >= 0.5).
3. Peak RSS of the resharding process above its RSS after imports, against the
   target 2 x the largest tensor + the largest output shard.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore")

# Runs in a fresh interpreter: measures its own peak RSS after imports and after resharding.
# The high-water mark is reset after imports (/proc/self/clear_refs), so the peak is the resharding's own.
_CHILD = r"""
import json, sys, time, warnings
warnings.filterwarnings("ignore")
sys.path.insert(0, {root!r})
from megafusion.checkpoint.reshard import reshard_checkpoint

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1])

base = status("VmRSS:")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
t0 = time.perf_counter()
reshard_checkpoint({src!r}, {out!r}, 1, 1, None, 2, progress=False, log=lambda s: None)
dt = time.perf_counter() - t0
print(json.dumps({{"seconds": dt, "base_kib": base, "peak_kib": status("VmHWM:")}}))
"""


def _bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def copy_fsynced(src: Path, dst: Path) -> float:
    """Seconds to copy every file under ``src`` to ``dst``, each fsynced: the plain-copy baseline."""
    t0 = time.perf_counter()
    for f in sorted(src.rglob("*")):
        if f.is_file():
            target = dst / f.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, target)
            fd = os.open(target, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
    return time.perf_counter() - t0


def _largest_full_tensor(index: dict) -> int:
    """Bytes of the largest whole (unsharded) trainable parameter, from the shapes in index.json."""
    from math import prod

    from megafusion.checkpoint.gather import canonical_name, shard_kind

    full: dict[str, int] = {}
    for rel, entry in index.items():
        if rel.startswith("model/"):
            for key, info in entry["tensors"].items():
                canon = canonical_name(key) or key
                n = prod(info["shape"]) * 4
                full[canon] = full.get(canon, 0) + n if shard_kind(canon) != "replicated" else n
    return max(full.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--ffn", type=int, default=2816)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--workdir", default=None, help="where to write (default: a temp dir; same disk for both)")
    args = ap.parse_args()

    from megafusion.config import load_config
    from megafusion.demo.tiny_llama import write_random_hf_llama

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_reshard_"))
    dims = [
        f"model.hidden_size={args.hidden}",
        f"model.num_layers={args.layers}",
        f"model.ffn_hidden_size={args.ffn}",
        f"model.num_attention_heads={args.hidden // 64}",
        f"model.num_kv_heads={args.hidden // 128}",
    ]
    cfg = load_config("tiny", dims)
    hf = write_random_hf_llama(cfg.model, work / "base", seed=0, max_params=None)
    run = work / "run"
    print(
        f"[bench] training one step at TP=2 to get a checkpoint ({args.hidden} hidden, {args.layers} layers)...",
        flush=True,
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    subprocess.run(
        [
            "torchrun",
            "--nproc_per_node",
            "2",
            "--master_port",
            "29533",
            "-m",
            "launcher.train",
            "--config",
            "tiny",
            *dims,
            "parallel.tensor_parallel=2",
            "optim.train_steps=1",
            "data.seq_length=64",
            "data.micro_batch_size=1",
            "data.global_batch_size=2",
            "logging.tensorboard=false",
            f"logging.run_dir={run}",
            f"checkpoint.hf_llama={hf}",
        ],
        cwd=ROOT,
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    ckpt = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    size = _bytes(ckpt)
    index = json.loads((ckpt / "index.json").read_text())
    largest = _largest_full_tensor(index)
    copies, reshards, peaks = [], [], []
    largest_out = 0

    def copy_once(i: int) -> None:
        dst = work / f"copy{i}"
        copies.append(copy_fsynced(ckpt, dst))
        shutil.rmtree(dst)

    def reshard_once(i: int) -> None:
        nonlocal largest_out
        out = work / f"resharded{i}"
        child = _CHILD.format(root=str(ROOT), src=str(ckpt), out=str(out))
        res = json.loads(
            subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, check=True, env=env)
            .stdout.strip()
            .splitlines()[-1]
        )
        reshards.append(res["seconds"])
        peaks.append((res["peak_kib"] - res["base_kib"]) * 1024)
        largest_out = max(f.stat().st_size for f in out.rglob("*.safetensors"))
        shutil.rmtree(out)

    for i in range(args.repeats):  # alternate which goes first; start each from a clean page cache state
        for op in (copy_once, reshard_once) if i % 2 == 0 else (reshard_once, copy_once):
            os.sync()
            time.sleep(1.0)
            op(i)
    copy_gbs, reshard_gbs = size / min(copies) / 1e9, size / min(reshards) / 1e9
    budget = 2 * largest + largest_out
    print(
        f"checkpoint {size / 2**20:.0f} MiB ({len(index)} files), largest tensor {largest / 2**20:.1f} MiB, "
        f"largest output shard {largest_out / 2**20:.0f} MiB"
    )
    print(
        f"copy     : {copy_gbs:.2f} GB/s (best of {args.repeats}: {min(copies):.2f} s; "
        f"all {[round(c, 2) for c in copies]})"
    )
    print(
        f"reshard  : {reshard_gbs:.2f} GB/s (best of {args.repeats}: {min(reshards):.2f} s; all "
        f"{[round(r, 2) for r in reshards]}), TP=2 -> TP=1 DP=2"
    )
    print(f"ratio reshard/copy = {reshard_gbs / copy_gbs:.3f}  (target >= 0.5)")
    peak = max(peaks)
    print(
        f"peak RSS above imports {peak / 2**20:.0f} MiB vs budget 2 x largest tensor + largest output shard "
        f"{budget / 2**20:.0f} MiB: ratio {peak / budget:.3f} (target <= 1); checkpoint/peak = {size / peak:.1f}"
    )
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

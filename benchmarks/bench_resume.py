"""Data-side resume start-up at a late step against an early one: O(1) with saved loader state.

    python benchmarks/bench_resume.py [--early 20] [--late 2000] [--samples 2000]

On the demo preset's data layout (DP=2, micro-batch 8, one micro-batch per step per DP rank,
data.num_workers=1) over latent shards of its latent shape (4 x 8 x 8, written here like the
precompute tool's output, ``--samples`` pairs in shards of 250), for DP rank 0:

  setup   : read the stream to step N (untimed) and take ``LoaderStream.state_dict()``, as a
            checkpoint at step N holds it;
  resume  : a fresh ``LoaderStream`` + ``load_state_dict(state, N)`` + the first micro-batch
            after it: what a requeued job's data side costs before its first step;
  replay  : the same first micro-batch without a saved state (how resume worked before: every
            consumed micro-batch decoded, tokenised and packed again).

Prints each time at --early and --late and the ratios late/early (target <= 1.2 with state;
replay grows with the step). The model and DeepSpeed start-up are the same at any step and
are not part of it.
"""

from __future__ import annotations

import argparse
import io
import random
import shutil
import sys
import tarfile
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore")

WORDS = "a red green blue yellow circle square triangle at the top left right bottom center".split()


def _write_shards(root: Path, samples: int, per_shard: int = 250) -> None:
    root.mkdir(parents=True)
    rng, words = np.random.default_rng(0), random.Random(0)
    for s in range(0, samples, per_shard):
        with tarfile.open(root / f"latents-{s // per_shard:06d}.tar", "w") as t:
            for k in range(s, min(samples, s + per_shard)):
                buf = io.BytesIO()
                np.save(buf, rng.standard_normal((4, 8, 8)).astype(np.float16), allow_pickle=False)
                caption = " ".join(words.choice(WORDS) for _ in range(words.randint(3, 8)))
                for ext, data in (("npy", buf.getvalue()), ("txt", caption.encode()), ("json", b"{}")):
                    info = tarfile.TarInfo(f"{k:07d}.{ext}")
                    info.size = len(data)
                    t.addfile(info, io.BytesIO(data))


def _settle() -> None:
    """Let the worker processes of dropped loaders exit, so they do not share the CPU with a timed run."""
    import gc

    gc.collect()
    time.sleep(1.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--early", type=int, default=20)
    ap.add_argument("--late", type=int, default=2000)
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import torch

    from megafusion.config import load_config
    from megafusion.data.stream import LoaderStream
    from megafusion.demo.tokenizer import write_word_tokenizer

    work = Path(tempfile.mkdtemp(prefix="bench_resume_"))
    try:
        _write_shards(work / "lat", args.samples)
        tok = write_word_tokenizer(work / "tok", WORDS)
        cfg = load_config("demo", [f"data.path={work / 'lat'}/latents-*.tar", f"data.tokenizer={tok}"])
        dp = 2
        micro = cfg.data.global_batch_size // (cfg.data.micro_batch_size * dp)
        cpu = torch.device("cpu")
        results: dict[int, dict[str, float]] = {}
        for step in (args.early, args.late):
            print(f"[bench] reading the stream to step {step} (setup, untimed)...", flush=True)
            stream = LoaderStream(cfg, 0, dp, cpu, micro)
            for s in range(step):
                for m in range(micro):
                    stream.item(s, m)
            state = stream.state_dict()
            del stream  # its loader worker process exits before anything is timed
            _settle()
            resumes, replays = [], []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                fresh = LoaderStream(cfg, 0, dp, cpu, micro)
                fresh.load_state_dict([state], step)
                a = fresh.item(step, 0)
                resumes.append(time.perf_counter() - t0)
                del fresh
                _settle()
                t0 = time.perf_counter()
                other = LoaderStream(cfg, 0, dp, cpu, micro)
                b = other.item(step, 0)  # no state: replays the consumed batches
                replays.append(time.perf_counter() - t0)
                del other
                _settle()
                assert a.batch.sample_keys == b.batch.sample_keys and torch.equal(a.batch.input_ids, b.batch.input_ids)
            results[step] = {"resume": min(resumes), "replay": min(replays)}
            print(
                f"step {step:>6}: resume with state {min(resumes):.3f} s, replay {min(replays):.3f} s "
                f"(best of {args.repeats}; both give the same next batch)",
                flush=True,
            )
        e, late = results[args.early], results[args.late]
        print(f"ratio resume late/early = {late['resume'] / e['resume']:.3f}  (target <= 1.2)")
        print(f"ratio replay late/early = {late['replay'] / e['replay']:.3f}  (before: grows with the step)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Quiet, useful console output: the known start-up warnings filtered once, other ranks silenced.

Every run on a machine without Transformer Engine or Apex (any CPU machine, many GPU ones) used to
print the same fallbacks once per import site and per rank, and the deprecations of the libraries
we pin, around the lines that matter. :func:`quiet_known_warnings` ignores exactly those (each
pattern below says why it is harmless) and returns a one-line note for the log, so nothing is
hidden silently; anything else still prints. :func:`silence_other_ranks` keeps rank 0's warnings
only, unless ``logging.all_ranks=true``: with 64 ranks one rank's warning is otherwise 64 lines.

Call :func:`quiet_known_warnings` before megatron-core, DeepSpeed or transformers are imported:
most of these warnings are raised at import time.
"""

from __future__ import annotations

import logging
import os
import warnings

KNOWN: tuple[tuple[str, type[Warning], str], ...] = (
    (
        r"Transformer Engine and Apex are not installed",
        UserWarning,
        "megatron-core falls back to torch kernels (apex is optional; torch's are the ones tested)",
    ),
    (r"Apex is not installed\. Falling back to Torch Norm", UserWarning, "the norm is megafusion's own"),
    (r"full scope is deprecated", UserWarning, "megatron-core's default CUDA-graph scope (graphs are off)"),
    (
        r"`torch\.distributed\.\w+` is deprecated",
        FutureWarning,
        "DeepSpeed's calls of torch.distributed's renamed collectives (same operation)",
    ),
)
"""(message regex, category, why it is harmless) of each filtered warning."""


def quiet_known_warnings() -> str:
    """Ignore the KNOWN warnings in this process (idempotent); returns the note to log once."""
    for pattern, category, _ in KNOWN:
        warnings.filterwarnings("ignore", message=pattern, category=category)
    return (
        f"[megafusion] {len(KNOWN)} known start-up warnings filtered (Transformer Engine / Apex fallbacks, "
        "megatron-core and torch.distributed deprecations; megafusion/console.py says why each is harmless)"
    )


def torchrun_env() -> dict[str, str]:
    """The environment for a torchrun child command: OMP_NUM_THREADS=1 unless set, which is the value
    torchrun itself sets when it is unset, after a banner on stderr; setting it first only drops the banner."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def silence_other_ranks(rank: int, all_ranks: bool = False) -> None:
    """On ranks other than 0, unless ``all_ranks``: no Python warnings, and library loggers at ERROR."""
    if rank == 0 or all_ranks:
        return
    warnings.simplefilter("ignore")
    for name in ("DeepSpeed", "deepspeed", "torch", "megatron", "transformers", "ray"):
        logging.getLogger(name).setLevel(logging.ERROR)

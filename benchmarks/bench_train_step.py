"""Training-step throughput: LlamaFusion (frozen text tower) vs a dense transformers Llama (all trainable).

    python benchmarks/bench_train_step.py [--hidden 512] [--layers 4] [--seq 512] [--iters 4]

Side by side in one run, one process, fp32 CPU, same dimensions and the same
number of tokens per step:
  fusion : the real Trainer step (megatron-core schedule + DeepSpeed ZeRO-1 on a
           one-rank group) on packed text+image batches; text tower frozen
  dense  : transformers.LlamaForCausalLM forward/backward on text + torch AdamW on all weights
Prints tokens/s of each, the step-time ratio fusion/dense (target <= 1.0: frozen
weights skip their weight gradients), and optimizer-state bytes against an
all-parameters-trainable baseline (target: exactly the trainable share).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore")

import torch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--ffn", type=int, default=1792)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--micro", type=int, default=2)
    ap.add_argument("--iters", type=int, default=4)
    args = ap.parse_args()

    from transformers import LlamaForCausalLM

    from megafusion.config import load_config
    from megafusion.demo.tiny_llama import write_random_hf_llama
    from megafusion.parallel.process_groups import init_model_parallel
    from megafusion.training.engine import optimizer_state_bytes
    from megafusion.training.trainer import Trainer

    tmp = Path(tempfile.mkdtemp(prefix="bench_train_"))
    cfg = load_config(
        "tiny",
        [
            f"model.hidden_size={args.hidden}",
            f"model.num_layers={args.layers}",
            f"model.ffn_hidden_size={args.ffn}",
            "model.num_attention_heads=8",
            "model.num_kv_heads=4",
            f"model.vocab_size={args.vocab}",
            f"model.boi_token_id={args.vocab - 2}",
            f"model.eoi_token_id={args.vocab - 1}",
            f"data.seq_length={args.seq}",
            f"data.micro_batch_size={args.micro}",
            f"data.global_batch_size={args.micro}",
            "logging.tensorboard=false",
            f"logging.run_dir={tmp}",
            "checkpoint.interval=1000000",
            "model.image.image_size=64",
            "model.image.unet_channels=32",
        ],
    )
    hf_dir = write_random_hf_llama(cfg.model, tmp / "llama", seed=0)
    init_model_parallel(1, 1)
    trainer = Trainer(cfg, str(hf_dir), log=lambda s: None)
    trainer.stream.caption_len = (48, 80)  # about half text, half image tokens
    item = trainer.stream.item(0, 0)
    img_share = float((item.batch.image_ids >= 0).float().mean())

    dense = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="sdpa")
    dense.train()
    dense_opt = torch.optim.AdamW(dense.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    ids = torch.randint(0, args.vocab - 2, (args.micro, args.seq))

    def dense_step():
        out = dense(input_ids=ids, labels=ids)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(dense.parameters(), 1.0)
        dense_opt.step()
        dense_opt.zero_grad(set_to_none=True)

    def fusion_step():
        trainer.train_step()

    times = {"fusion": [], "dense": []}
    for it in range(args.iters + 1):  # first round warms up
        for name, fn in (("fusion", fusion_step), ("dense", dense_step)):
            t0 = time.perf_counter()
            fn()
            if it:
                times[name].append(time.perf_counter() - t0)
    tokens = args.micro * args.seq
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"dims: hidden {args.hidden}, {args.layers} layers, ffn {args.ffn}, vocab {args.vocab}; "
        f"{tokens} tokens/step ({img_share:.0%} image tokens in the fusion batch), fp32, "
        f"{torch.get_num_threads()} threads"
    )
    for k in ("fusion", "dense"):
        print(f"  {k:<6} step {med[k] * 1000:8.1f} ms  {tokens / med[k]:8.0f} tok/s")
    print(f"ratio step time fusion/dense = {med['fusion'] / med['dense']:.3f}   (target <= 1.0)")

    trainable = sum(p.numel() for p in trainer.trainable_parameters())
    moments = sum(
        v.numel() * v.element_size()
        for st in trainer.optimizer.optimizer.state.values()
        for key, v in st.items()
        if key in ("exp_avg", "exp_avg_sq")
    )
    dense_moments = sum(
        v.numel() * v.element_size()
        for st in dense_opt.state.values()
        for key, v in st.items()
        if key in ("exp_avg", "exp_avg_sq")
    )
    all_params = sum(p.numel() for p in dense.parameters())
    print(
        f"optimizer state (Adam moments) per rank: fusion {moments / 2**20:.2f} MiB vs all-trainable "
        f"{dense_moments / 2**20:.2f} MiB -> ratio {moments / dense_moments:.3f}; "
        f"trainable params {trainable / 1e6:.2f}M, moments = 8 bytes x trainable: {moments == 8 * trainable}"
    )
    print(
        f"  (fusion also keeps a {(optimizer_state_bytes(trainer.optimizer) - moments) / 2**20:.2f} MiB fp32 "
        f"master partition of the trainable weights; dense baseline params {all_params / 1e6:.2f}M)"
    )


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""What LoRA's unmerged tail costs per adapted linear at the Qwen3-VL-8B shapes, and what fusing it saves.

The H200 profile of the fast path at b=32 (docs/benchmarks.md) showed elementwise kernels costing about as
much as the matmuls; LoRA's scale-and-add around each of the 252 adapted linears is a suspect. This prints,
per linear shape of one decoder layer and for a batch-1 and a batch-32 suffix, the median time of:
  base      y = x W^T (no adapter: the floor)
  peft-fp32 peft's LoRA Linear forward as get_peft_model leaves it (r=64, alpha=128, dropout 0): adapter
            weights in float32 on a bf16 model (autocast_adapter_dtype), so the input is cast per call
  peft      the same layer cast to the model's dtype: what the engine runs (its loading moves the whole
            model, adapters included, to one dtype)
  fused     y = x W^T, then y += (x A^T) (s B)^T in place (addmm_, the scale folded into B once)
  merged    y = x (W + s B A)^T (one adapter merged: the upper bound, not usable with three adapters)
and the sums over one layer x 36 layers. Not a test; random bf16 weights; CUDA only (CPU: --smoke).
    python benchmarks/bench_lora_tail.py
"""

from __future__ import annotations

import argparse
import statistics

import torch

# Qwen3-VL-8B text decoder: hidden 4096, 32 q heads / 8 kv heads of 128, MLP 12288
SHAPES = {
    "q_proj": (4096, 4096),
    "k_proj": (4096, 1024),
    "v_proj": (4096, 1024),
    "o_proj": (4096, 4096),
    "gate_proj": (4096, 12288),
    "up_proj": (4096, 12288),
    "down_proj": (12288, 4096),
}

VARIANTS = ("base", "peft-fp32", "peft", "fused", "merged")


def timed(fn, reps: int, cuda: bool) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            import time

            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def measure(x, layer, scale: float, reps: int, cuda: bool) -> tuple[dict, float]:
    """Median ms of the variants on one adapted linear, and the fused path's relative error (vs peft-fp32)."""
    weight = layer.base_layer.weight
    a = layer.lora_A["default"].weight.to(x.dtype)  # (r, in); peft keeps adapters in float32
    b_scaled = (layer.lora_B["default"].weight * scale).to(x.dtype).contiguous()  # (out, r)
    merged = (weight + b_scaled @ a).contiguous()

    def fused():
        y = x @ weight.t()
        y.addmm_(x @ a.t(), b_scaled.t())
        return y

    ref = layer(x)
    err = (fused() - ref).abs().max().item() / ref.abs().max().item()
    row = dict(
        base=timed(lambda: x @ weight.t(), reps, cuda),
        **{"peft-fp32": timed(lambda: layer(x), reps, cuda)},
    )
    layer.to(x.dtype)  # as the engine's loading does
    row.update(
        peft=timed(lambda: layer(x), reps, cuda),
        fused=timed(fused, reps, cuda),
        merged=timed(lambda: x @ merged.t(), reps, cuda),
    )
    return row, err


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--tokens", type=int, nargs="+", default=[400, 12800], help="suffix tokens (b=1, b=32)"
    )
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--smoke", action="store_true", help="toy sizes on the CPU")
    args = parser.parse_args()
    from peft import LoraConfig, get_peft_model

    cuda = torch.cuda.is_available() and not args.smoke
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    shapes = {k: (i // 32, o // 32) for k, (i, o) in SHAPES.items()} if args.smoke else SHAPES
    tokens = [t // 50 for t in args.tokens] if args.smoke else args.tokens
    r, scale = args.rank, 2.0
    name = torch.cuda.get_device_name() if cuda else "CPU"
    print(f"# LoRA tail per adapted linear, {name}, {dtype}, r={r}, median of {args.reps} (ms)")
    print("| tokens | linear | base | peft-fp32 | peft | fused | merged | peft - base | fused - base |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n in tokens:
        totals = dict.fromkeys(VARIANTS, 0.0)
        for key, (fan_in, fan_out) in shapes.items():
            torch.manual_seed(0)
            x = torch.randn(n, fan_in, device=device, dtype=dtype)
            module = torch.nn.Sequential(torch.nn.Linear(fan_in, fan_out, bias=False)).to(device, dtype)
            lora = LoraConfig(r=r, lora_alpha=int(scale * r), target_modules=["0"], lora_dropout=0.0)
            peft_model = get_peft_model(module, lora)
            layer = peft_model.base_model.model[0]
            with torch.no_grad():
                layer.lora_B["default"].weight.normal_(0.0, 1e-2)
            with torch.no_grad():
                row, err = measure(x, layer, scale, args.reps, cuda)
            for k in totals:
                totals[k] += row[k]
            cells = [row[k] for k in VARIANTS]
            cells += [row["peft"] - row["base"], row["fused"] - row["base"]]
            flag = "" if err < 2e-2 else f" FUSED DIFFERS ({err:.1e})"
            print(
                f"| {n} | {key} ({fan_in}->{fan_out}) | "
                + " | ".join(f"{c:.3f}" for c in cells)
                + f" |{flag}"
            )
        layers = 36
        cells = [totals[k] for k in VARIANTS]
        cells += [totals["peft"] - totals["base"], totals["fused"] - totals["base"]]
        print(
            f"| {n} | **x{layers} layers** | " + " | ".join(f"{c * layers:.1f}" for c in cells) + " |",
            flush=True,
        )


if __name__ == "__main__":
    main()

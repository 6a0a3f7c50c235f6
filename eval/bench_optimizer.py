"""Optimizer cost on LoRA-shaped tensors: ivon_lora.IVON vs the reference ivon-opt vs torch AdamW.

Measured side by side in one run on the same tensors (rank-8 q/v adapters of a 7B-like model by default:
32 layers x {q, v} x {A: 8x4096, B: 4096x8}, 4.2M parameters). Gradients are synthetic: this isolates the
optimizer from the model. Reported:

* ``step``            the optimizer's update alone (IVON: after the samples were captured);
* ``sample+capture``  IVON's per-sample overhead (draw θ = m + σ·ε, capture g and (θ−m)·g, restore m);
* ``state MiB``       persistent optimizer state (AdamW: exp_avg + exp_avg_sq; IVON: h + momentum);
* on CUDA also the peak memory of one full iteration.

    python eval/bench_optimizer.py [--device cuda] [--layers 32] [--hidden 4096] [--rank 8] [--repeats 50]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from ivon_lora import IVON


def lora_shaped_params(layers: int, hidden: int, rank: int, device: str) -> list[nn.Parameter]:
    shapes = [(rank, hidden), (hidden, rank)] * 2 * layers
    return [nn.Parameter(torch.randn(shape, device=device) * 0.01) for shape in shapes]


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], None], device: str, repeats: int, setup: Callable[[], None] | None = None) -> float:
    """Median wall time of ``fn`` in milliseconds after two warm-up calls; ``setup`` runs untimed before each."""
    times = []
    for i in range(repeats + 2):
        if setup is not None:
            setup()
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        if i >= 2:
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def state_mib(optimizer: torch.optim.Optimizer) -> float:
    states = [s for s in optimizer.state.values() if isinstance(s, dict)]  # ivon-opt also keeps counters there
    tensors = [v for s in states for v in s.values() if torch.is_tensor(v) and v.numel() > 1]
    for group in optimizer.param_groups:  # ivon-opt keeps its state in the param groups
        tensors += [v for v in group.values() if torch.is_tensor(v) and v.numel() > 1]
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    device = args.device
    hyper = dict(lr=0.03, ess=1e6, hess_init=1e-3, weight_decay=0.0, clip_radius=1e-3, rescale_lr=False)

    params = lora_shaped_params(args.layers, args.hidden, args.rank, device)
    grads = [torch.randn_like(p) * 1e-3 for p in params]

    def set_grads() -> None:
        for p, g in zip(params, grads):
            p.grad = g.clone()

    results: dict[str, dict[str, float]] = {}

    adamw = torch.optim.AdamW(params, lr=5e-5, weight_decay=0.0, foreach=True)
    set_grads()
    results["AdamW (foreach)"] = {"step": timed(adamw.step, device, args.repeats), "state": state_mib(adamw)}

    ours = IVON(params, **hyper)

    def ours_sample() -> None:
        with ours.sampled_params(train=True):
            set_grads()

    # A step consumes the captured sample, so each timed step is preceded by an untimed sample.
    results["ivon_lora.IVON"] = {
        "step": timed(ours.step, device, args.repeats, setup=ours_sample),
        "sample+capture": timed(ours_sample, device, args.repeats),
    }
    ours.step()  # consume the samples accumulated while timing
    results["ivon_lora.IVON"]["state"] = state_mib(ours)

    try:
        import ivon as ivon_reference
    except ImportError:
        ivon_reference = None
    if ivon_reference is not None:
        ref = ivon_reference.IVON(params, **hyper)

        def ref_sample() -> None:
            with ref.sampled_params(train=True):
                set_grads()

        results["ivon-opt (reference)"] = {
            "step": timed(ref.step, device, args.repeats, setup=ref_sample),
            "sample+capture": timed(ref_sample, device, args.repeats),
            "state": state_mib(ref),
        }
        ref.step()

    if device.startswith("cuda"):
        for name, iteration in [("AdamW (foreach)", lambda: (set_grads(), adamw.step())),
                                ("ivon_lora.IVON", lambda: (ours_sample(), ours.step()))]:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            iteration()
            torch.cuda.synchronize()
            results[name]["peak"] = torch.cuda.max_memory_allocated() / 2**20

    numel = sum(p.numel() for p in params)
    print(f"device={device}  tensors={len(params)}  parameters={numel / 1e6:.2f}M  repeats={args.repeats}")
    base = results["AdamW (foreach)"]["step"]
    print(f"{'optimizer':<24}{'step ms':>10}{'vs AdamW':>10}{'sample ms':>11}{'state MiB':>11}{'peak MiB':>10}")
    for name, r in results.items():
        sample = f"{r['sample+capture']:.2f}" if "sample+capture" in r else "-"
        peak = f"{r['peak']:.0f}" if "peak" in r else "-"
        print(f"{name:<24}{r['step']:>10.2f}{r['step'] / base:>10.2f}{sample:>11}{r['state']:>11.1f}{peak:>10}")
    if "ivon-opt (reference)" in results:
        ref_r, ours_r = results["ivon-opt (reference)"], results["ivon_lora.IVON"]
        print(f"ours/reference: step {ours_r['step'] / ref_r['step']:.2f}x, "
              f"sample+capture {ours_r['sample+capture'] / ref_r['sample+capture']:.2f}x")


if __name__ == "__main__":
    main()

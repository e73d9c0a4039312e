"""Benchmark: fused softmax-with-temperature kernel vs its reference vs ``torch.softmax(x / T)``.

    python benchmarks/temperature_softmax.py            # full sizes (GPU)
    python benchmarks/temperature_softmax.py --quick    # tiny sizes, interpreter on CPU, checks

Reports time and effective bandwidth (one read + one write of the logits for the ideal kernel).
"""

from __future__ import annotations

import harness

harness.enable_interpreter_if_cpu()

import torch  # noqa: E402

from tokenlab.kernels import temperature_softmax  # noqa: E402
from tokenlab.testing import assert_relative_error  # noqa: E402


def main() -> None:
    args = harness.parser(__doc__.splitlines()[0]).parse_args()
    device = harness.device_from(args)
    repeats = args.repeats or (3 if args.quick else 20)
    shapes = (
        [(4, 1000), (3, 4099)] if args.quick else [(8, 32_000), (32, 32_000), (8, 128_000), (64, 128_000)]
    )
    dtype = torch.float32 if args.quick else torch.bfloat16
    temperature = 0.7
    rows = []
    for n, V in shapes:
        x = torch.randn(n, V, device=device, dtype=dtype) * 4
        ref = temperature_softmax(x.double(), temperature, backend="reference")
        out = temperature_softmax(x, temperature, backend="triton")
        err = assert_relative_error(
            out, ref, 1e-5 if dtype == torch.float32 else 1e-2, "triton vs float64 reference"
        )
        candidates = {
            "triton": lambda x=x: temperature_softmax(x, temperature, backend="triton"),
            "reference": lambda x=x: temperature_softmax(x, temperature, backend="reference"),
            "torch.softmax": lambda x=x: torch.softmax(x / temperature, -1),
        }
        ms = {name: harness.time_fn(fn, device, repeats=repeats) for name, fn in candidates.items()}
        gbytes = 2 * x.numel() * x.element_size() / 1e9
        rows.append(
            {
                "rows": n,
                "V": V,
                "dtype": str(dtype).removeprefix("torch."),
                "rel_err": err,
                "triton_ms": ms["triton"],
                "reference_ms": ms["reference"],
                "torch_ms": ms["torch.softmax"],
                "triton_GB/s": gbytes / (ms["triton"] / 1e3),
                "speedup_vs_torch": ms["torch.softmax"] / ms["triton"],
            }
        )
    harness.print_table(rows, list(rows[0]))
    harness.finish(args, device, "temperature_softmax", rows)


if __name__ == "__main__":
    main()

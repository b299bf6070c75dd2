"""Times the hash-grid encoding forward + backward on the current device.

    python bench/hashgrid.py [--backend torch triton] [--points 18 20] [--repeats 20] [--copies 16 0] [--density]

Prints one row per backend and point count: milliseconds for forward alone,
for forward + backward (gradient w.r.t. the table), for the second-order
pass analytic normals train through (forward, dL/dfeatures from the
features, dL/dx with a graph, then the backward of both; for the Triton grid
paired, its two table gradients in one scatter, and ``unpaired``, in two),
and peak CUDA memory. The Triton backend runs once per
``--copies`` value (replicas of the coarse levels' gradient rows; 0 = plain
atomic adds). With ``--density`` (Triton), a second table times the default
field's density queries without gradients, as the ray sampler makes them
(chunks of 2^21 points, under bf16 and fp16 autocast: the kernel serves only
half-precision queries): the encoding then the MLP in PyTorch against the fused
lookup + MLP kernel (``field.fused_density``), and the largest difference
between the two. CUDA timings use CUDA events
after warm-up.
"""

from __future__ import annotations

import argparse
import functools
import time

import torch

from recon.encoding import HashGridConfig, make_encoding


def _time_ms(fn, repeats: int, device: torch.device) -> float:
    """Mean milliseconds of ``fn()`` over ``repeats`` runs after two warm-up runs."""
    for _ in range(2):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / repeats
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) * 1000.0 / repeats


def main() -> None:
    """Parses the flags, runs the timings and prints the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", nargs="+", default=["torch"], choices=["auto", "torch", "triton", "tcnn"])
    parser.add_argument("--points", type=int, nargs="+", default=[18, 20], help="log2 of the point counts")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--spread", type=float, default=1.0, help="points uniform in a centred cube of this side (small = clustered, contended)")
    parser.add_argument("--copies", type=int, nargs="+", default=[16, 0], help="Triton: gradient replicas of the coarse levels")
    parser.add_argument("--density", action="store_true", help="also time the field's density queries, reference vs fused kernel")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"hash grid on {name}, 16 levels x 2 features, 2^19 table, points in a cube of side {args.spread}")
    print(f"{'backend':>12} {'points':>10} {'forward ms':>11} {'fwd+bwd ms':>11} {'Mpts/s':>8} {'2nd-order ms':>13} {'unpaired ms':>13} {'peak GiB':>9}")
    for backend in args.backend:
        for copies in args.copies if backend == "triton" else [None]:
            _bench_backend(backend, args, device, copies)
    if args.density:
        _bench_density(args, device)


def _bench_backend(backend: str, args: argparse.Namespace, device: torch.device, copies: int | None) -> None:
    """Prints one row per point count for one backend."""
    torch.manual_seed(0)
    encoding = make_encoding(HashGridConfig(backend=backend))
    name = encoding.backend_name
    if copies is not None and encoding.backend_name == "triton":
        from recon.encoding.triton_backend import TritonHashGrid

        encoding.backend = TritonHashGrid(encoding.cfg, private_copies=copies)
        name = f"triton/{copies}"
    encoding = encoding.to(device)
    fused = hasattr(encoding.backend, "encode_with_input_gradient")
    for log2 in args.points:
        x = 0.5 + (torch.rand(2**log2, 3, device=device) - 0.5) * args.spread

        def forward(x: torch.Tensor = x) -> None:
            with torch.no_grad():
                encoding(x)

        def forward_backward(x: torch.Tensor = x) -> None:
            encoding.zero_grad(set_to_none=True)
            encoding(x).sum().backward()

        def second_order(x: torch.Tensor = x, paired: bool = True) -> None:
            # as analytic normals train: dL/dfeatures computed from the features, dL/dx with its graph, then
            # the backward of a loss on both (the Triton grid's pair adds both table gradients in one scatter)
            encoding.zero_grad(set_to_none=True)
            if fused and paired:
                features, input_gradient = encoding.encode_with_input_gradient(x)
            elif fused:
                features = encoding(x)
                input_gradient = functools.partial(encoding.backend.input_gradient, x)
            else:
                point = x.detach().requires_grad_()
                features = encoding(point)

                def input_gradient(grad: torch.Tensor, features: torch.Tensor = features, point: torch.Tensor = point) -> torch.Tensor:
                    return torch.autograd.grad(features, point, grad, create_graph=True)[0]

            grad_x = input_gradient(torch.sigmoid(features))
            (features.sum() + grad_x.square().sum()).backward()

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        fwd = _time_ms(forward, args.repeats, device)
        both = _time_ms(forward_backward, args.repeats, device)
        second = _time_ms(second_order, args.repeats, device)
        unpaired = f"{_time_ms(functools.partial(second_order, paired=False), args.repeats, device):.2f}" if fused else "-"
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        print(f"{name:>12} {2**log2:>10} {fwd:>11.2f} {both:>11.2f} {2**log2 / both / 1e3:>8.2f} {second:>13.2f} {unpaired:>13} {peak:>9.2f}")


def _bench_density(args: argparse.Namespace, device: torch.device) -> None:
    """Prints one row per point count and precision: the field's density queries, reference vs fused."""
    from recon.field import FieldConfig, RadianceField

    torch.manual_seed(0)
    field = RadianceField(FieldConfig(encoding=HashGridConfig(backend="triton"), fused_density=True)).to(device)
    with torch.no_grad():
        field.encoding.backend.table.uniform_(-0.1, 0.1)  # a trained-like table, not the near-zero initial one
    print(f"\n{'precision':>10} {'points':>10} {'reference ms':>13} {'fused ms':>9} {'max |diff|':>11} {'max density':>12}")
    for log2 in args.points:
        x = (torch.rand(2**log2, 3, device=device) - 0.5) * args.spread
        chunks = x.split(2**21)
        for precision, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):

            def densities(chunks: tuple[torch.Tensor, ...] = chunks, dtype: torch.dtype = dtype) -> torch.Tensor:
                with torch.no_grad(), torch.autocast(device.type, dtype=dtype):
                    return torch.cat([field.density(chunk) for chunk in chunks])

            fused = _time_ms(densities, args.repeats, device)
            fused_values = densities()
            field.cfg.fused_density = False
            reference = _time_ms(densities, args.repeats, device)
            reference_values = densities()
            field.cfg.fused_density = True
            diff = (fused_values.float() - reference_values.float()).abs().max().item()
            print(f"{precision:>10} {2**log2:>10} {reference:>13.2f} {fused:>9.2f} {diff:>11.2e} {reference_values.max().item():>12.3g}")


if __name__ == "__main__":
    main()

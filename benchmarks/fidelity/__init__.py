"""Fidelity of AT-EDM on a small SDXL-shaped UNet trained on this CPU (learned, non-uniform attention).

    python -m benchmarks.fidelity.train            # ~22 min CPU on one thread; writes benchmarks/fidelity/model/
    python -m benchmarks.fidelity.bench_fidelity   # CSV + plot under benchmarks/results/fidelity/
"""

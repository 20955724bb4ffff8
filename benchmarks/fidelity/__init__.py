"""Fidelity of AT-EDM on small SDXL-shaped UNets trained on this CPU (learned, non-uniform attention).

    python -m benchmarks.fidelity.train            # digits: ~22 min CPU on one thread; writes benchmarks/fidelity/model/
    python -m benchmarks.fidelity.train --model scenes --steps 2000 --max-minutes 82 --resume
                                                   # colour scenes: ~90 min; writes benchmarks/fidelity/scenes_model/
    python -m benchmarks.fidelity.bench_fidelity [--model scenes]   # CSV + plot under benchmarks/results/
"""

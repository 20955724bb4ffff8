"""How the PyTorch references bound their memory: never a per-head N x N tensor for all heads at once."""

from __future__ import annotations

# One fp32 score chunk of at most this many bytes: at SDXL level 2 (N = 4096, B = 2) that is 2 heads
# of 2 x 4096 x 4096 x 4 bytes, which keeps a 1024 px reference pass within a few hundred MB.
REFERENCE_CHUNK_BYTES = 256 * 1024 * 1024


def heads_per_chunk(batch: int, num_heads: int, rows: int, cols: int, bytes_per_elem: int = 4) -> int:
    """Heads processed together so that one (batch, heads, rows, cols) score block fits the budget."""
    per_head = max(1, batch * rows * cols * bytes_per_elem)
    return max(1, min(num_heads, REFERENCE_CHUNK_BYTES // per_head))


def rows_per_chunk(batch: int, rows: int, cols: int, bytes_per_elem: int = 4) -> int:
    """Rows processed together so that one (batch, rows, cols) block fits the budget."""
    per_row = max(1, batch * cols * bytes_per_elem)
    return max(1, min(rows, REFERENCE_CHUNK_BYTES // per_row))

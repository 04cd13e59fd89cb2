"""What the machine offers and how a run shows itself: BLAS, memory, the doctor, progress reports, plots."""

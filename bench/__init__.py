"""lmcor.bench: side-by-side benchmarks of lmcor and the systems users would pick instead."""

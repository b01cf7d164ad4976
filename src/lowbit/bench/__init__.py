"""Benchmarks: ``lowbit bench`` (speed, memory and accuracy of lowbit recipes vs FP and peers)."""

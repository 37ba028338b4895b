"""GPU benchmarks: our engine against the trainers users would pick instead (see README.md)."""

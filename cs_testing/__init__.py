"""What the tests and the benchmarks share: tiny models, a CRM emulator, a local cluster, sample knowledge."""

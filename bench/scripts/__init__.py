"""One-off benchmarks and the GPU machine's runners (bench/RESULTS.md says what each measured).

The bench-io package itself (``rcengine bench-io``) is the folder above."""

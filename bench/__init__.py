"""``rcengine.bench``: the evaluation (task suite, bench-io runner, analysis and report) and the
benchmark scripts.  Not imported by ``import rcengine``; the CLI loads it for ``bench-io``."""

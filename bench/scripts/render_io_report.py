"""Re-render a bench-io report from its report.json with this checkout's analysis and report code.

    python bench/scripts/render_io_report.py REPORT.json OUT_DIR

The trade-off (rho*, break-even, measured and modelled times) is recomputed from the report's
overview rows; everything measured is taken as it is.  For reports fetched from the GPU machine.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rcengine import BenchIOConfig, write_report
from rcengine.bench.io_analysis import tradeoff


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    report = json.loads(Path(sys.argv[1]).read_text())
    cfg = report["meta"]["config"]
    fields = {k: (tuple(tuple(x) if isinstance(x, list) else x for x in v) if isinstance(v, list) else v) for k, v in cfg.items()
              if k in BenchIOConfig.__dataclass_fields__}
    config = BenchIOConfig(**fields)
    lengths = sorted({r["length"] for r in report["overview"]})
    report["tradeoff"] = [t for n in lengths for t in tradeoff([r for r in report["overview"] if r["length"] == n], config.variants(),
                                                               config.tiers, report["meta"]["quality_tier"], config.bandwidths, n)]
    for path in write_report(report, sys.argv[2]):
        print(path)


if __name__ == "__main__":
    main()

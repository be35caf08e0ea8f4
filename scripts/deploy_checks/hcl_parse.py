"""Every .tf file under terraform/ parses with python-hcl2 (terraform init/validate need the
provider, which may not be installable; this catches syntax errors everywhere)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, Failures, load_tf, tf_files  # noqa: E402


def main() -> None:
    failures = Failures("hcl")
    files = tf_files()
    blocks = 0
    for path in files:
        try:
            doc = load_tf(path)
        except Exception as error:  # noqa: BLE001 - any parse error is the finding
            failures.add(f"{path.relative_to(ROOT)}: {type(error).__name__}: {error}")
            continue
        blocks += sum(len(v) for k, v in doc.items() if isinstance(v, list))
    if not files:
        failures.add("no .tf files under terraform/")
    failures.finish(f"{len(files)} .tf files parse ({blocks} top-level blocks)")


if __name__ == "__main__":
    main()

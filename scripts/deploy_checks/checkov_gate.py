"""Runs checkov on terraform/ and template.yaml and passes only with no failed check, no
parsing error, and a written reason on every skip (`#checkov:skip=CKV_...:reason`).

usage: checkov_gate.py CHECKOV_BINARY
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, TEMPLATE, Failures, tf_files  # noqa: E402

SKIP = re.compile(r"checkov:skip=([A-Z0-9_]+)(?::(.*))?")
MIN_REASON = 20
RUNS = {
    "terraform": ["--framework", "terraform", "-d", "terraform"],
    "cloudformation": ["--framework", "cloudformation", "-f", "template.yaml"],
}


def main() -> None:
    checkov = sys.argv[1]
    failures = Failures("checkov")

    # Every skip comment carries a reason.
    written: dict[str, set[str]] = {}
    for path in [TEMPLATE, *tf_files()]:
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for m in SKIP.finditer(line):
                reason = (m.group(2) or "").strip()
                where = f"{path.relative_to(ROOT)}:{n}"
                if len(reason) < MIN_REASON:
                    failures.add(f"{where}: skip of {m.group(1)} without a written reason")
                written.setdefault(m.group(1), set()).add(where)

    summary = []
    skipped_ids: set[str] = set()
    for name, args in RUNS.items():
        proc = subprocess.run(
            [checkov, *args, "--skip-download", "--output", "json", "--soft-fail"],
            cwd=ROOT, capture_output=True, text=True, check=False,
        )
        try:
            report = json.loads(proc.stdout)
        except json.JSONDecodeError:
            failures.add(f"{name}: checkov gave no JSON report (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
            continue
        for r in report if isinstance(report, list) else [report]:
            s = r.get("summary", {})
            if not s.get("resource_count"):
                failures.add(f"{name}: checkov found no resources to check")
            if s.get("parsing_errors"):
                failures.add(f"{name}: {s['parsing_errors']} parsing errors")
            results = r.get("results", {})
            for c in results.get("failed_checks", []):
                failures.add(f"{name}: {c['check_id']} failed for {c['resource']} ({c['file_path']}:{c['file_line_range'][0]}): {c['check_name']}")
            for c in results.get("skipped_checks", []):
                skipped_ids.add(c["check_id"])
                comment = (c.get("check_result") or {}).get("suppress_comment") or ""
                if len(comment.strip()) < MIN_REASON or comment.strip() == "No comment provided":
                    failures.add(f"{name}: {c['check_id']} skipped for {c['resource']} without a written reason")
            summary.append(f"{name}: {s.get('passed', 0)} passed, {s.get('skipped', 0)} skipped with reasons")
    for check_id in sorted(set(written) - skipped_ids):
        print(f"checkov: note: skip of {check_id} at {', '.join(sorted(written[check_id]))} matches no check that ran", file=sys.stderr)
    failures.finish("; ".join(summary) + ", 0 failed")


if __name__ == "__main__":
    main()

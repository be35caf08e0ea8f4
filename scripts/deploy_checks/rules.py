"""Every EventBridge rule of both templates against every EventBridge sample the tests hold,
with EventBridge's pattern semantics as moto implements them (moto.events.models.EventPattern,
in-process: moto's TestEventPattern API is an empty stub).

What nth does with each sample is not written down here: `nth-lambda explain` says it (the
real parser and policy). Then, with every rule enabled:

- an event nth handles (or fails, which must reach the function to land in its dead-letter
  queue) matches exactly one rule: it is invoked once;
- an event nth skips matches no rule: it costs no invocation;
- the same event from another account matches no rule (every pattern pins the account);
- with auto_scaling_group_names / AutoScalingGroupNames set, a lifecycle action of a named
  group matches its rule and one of another group matches none;
- every rule is matched by at least one sample;
- template.yaml's patterns, resolved for the deployment's account, equal terraform/'s as
  `terraform plan` renders them (when plans are given).

Samples carry account 123456789012; each is given the deployment's account before matching.

Run with moto's venv Python (moto, PyYAML) by scripts/check-rules:
  rules.py --nth-lambda BIN [--plan NAME=PLAN.json ...] [--account ACCOUNT]
where NAME is `all-groups` (no group names) or `named-groups` (GROUP below).
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, Failures, cfn_resources, load_cfn  # noqa: E402
from moto.events.models import EventPattern, EventPatternParser  # noqa: E402

SAMPLES = ROOT / "tests" / "events" / "eventbridge"
SAMPLE_ACCOUNT = "123456789012"
OTHER_ACCOUNT = "210987654321"
# The group the lifecycle samples name, and one they do not.
GROUP = "eks-workers-a"
OTHER_GROUP = "eks-workers-other"
VARIANTS = {"all-groups": [], "named-groups": [GROUP]}
NO_VALUE = object()

Rules = dict[str, dict[str, Any]]  # rule name -> pattern


def resolve(value: Any, account: str, groups: list[str], conditions: dict[str, bool]) -> Any:
    """An EventPattern with its intrinsics (!Ref, !If) resolved; AWS::NoValue drops out."""
    if isinstance(value, dict) and set(value) == {"Ref"}:
        ref = value["Ref"]
        if ref == "AWS::AccountId":
            return account
        if ref == "AWS::NoValue":
            return NO_VALUE
        if ref == "AutoScalingGroupNames":
            return groups
        raise SystemExit(f"template.yaml: EventPattern refers to {ref}, which rules.py cannot resolve")
    if isinstance(value, dict) and set(value) == {"Fn::If"}:
        cond, yes, no = value["Fn::If"]
        if cond not in conditions:
            raise SystemExit(f"template.yaml: EventPattern depends on condition {cond}, which rules.py cannot evaluate")
        return resolve(yes if conditions[cond] else no, account, groups, conditions)
    if isinstance(value, dict):
        out = {k: resolve(v, account, groups, conditions) for k, v in value.items()}
        return {k: v for k, v in out.items() if v is not NO_VALUE}
    if isinstance(value, list):
        return [v for v in (resolve(x, account, groups, conditions) for x in value) if v is not NO_VALUE]
    return value


def template_rules(account: str, groups: list[str]) -> Rules:
    conditions = {"HasGroupNames": bool(groups)}
    rules = {}
    for name, resource in cfn_resources(load_cfn()).items():
        if resource["Type"] == "AWS::Events::Rule":
            rules[name] = resolve(resource["Properties"]["EventPattern"], account, groups, conditions)
    return rules


def terraform_rules(plan_path: Path) -> Rules:
    plan = json.loads(plan_path.read_text(encoding="utf-8"))
    rules = {}
    for r in plan["planned_values"]["root_module"]["resources"]:
        if r["type"] == "aws_cloudwatch_event_rule":
            rules[f'{r["name"]}["{r["index"]}"]'] = json.loads(r["values"]["event_pattern"])
    return rules


def matcher(name: str, pattern: dict[str, Any], failures: Failures) -> EventPattern | None:
    raw = json.dumps(pattern)
    try:
        return EventPattern(raw, EventPatternParser(raw).parse())
    except Exception as e:  # moto's InvalidEventPatternException
        failures.add(f"{name}: moto refuses the pattern {raw}: {e}")
        return None


def explain(nth_lambda: str, event: dict[str, Any]) -> tuple[str, str]:
    """('handled', actions) | ('skipped', reason) | ('fails', error), from `nth-lambda explain -`."""
    proc = subprocess.run(
        [nth_lambda, "explain", "-"],
        input=json.dumps(event),
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": "/usr/bin:/bin", "LOG_LEVEL": "error"},
    )
    if proc.returncode != 0:
        return "fails", (proc.stderr.strip().splitlines() or ["exit status %d" % proc.returncode])[-1]
    out = json.loads(proc.stdout)
    if out.get("skipped"):
        return "skipped", out["skipped"]
    return "handled", ", ".join(sorted({i["action"] for i in out["interruptions"]}))


def with_account(event: dict[str, Any], account: str) -> dict[str, Any]:
    e = copy.deepcopy(event)
    e["account"] = account
    # Resource ARNs name the account too; patterns do not look at them, but keep them true.
    e["resources"] = [r.replace(f":{SAMPLE_ACCOUNT}:", f":{account}:") for r in e.get("resources", [])]
    return e


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nth-lambda", required=True)
    ap.add_argument("--plan", action="append", default=[], help="NAME=terraform show -json output")
    ap.add_argument("--account", default=None, help="the deployment's account; default: the plans', else the samples'")
    args = ap.parse_args()
    failures = Failures("rules x samples")

    plans = {}
    for item in args.plan:
        name, _, path = item.partition("=")
        if name not in VARIANTS:
            raise SystemExit(f"--plan {item}: NAME must be one of {', '.join(VARIANTS)}")
        plans[name] = terraform_rules(Path(path))

    # The deployment's account: what terraform rendered into the patterns (moto's STS).
    accounts = {a for rules in plans.values() for p in rules.values() for a in p.get("account", [])}
    if args.account:
        account = args.account
    elif len(accounts) == 1:
        account = accounts.pop()
    elif not accounts:
        account = SAMPLE_ACCOUNT
    else:
        raise SystemExit(f"terraform's patterns pin several accounts: {sorted(accounts)}")

    samples = {p.name: json.loads(p.read_text(encoding="utf-8")) for p in sorted(SAMPLES.glob("*.json"))}
    if not samples:
        raise SystemExit(f"no samples in {SAMPLES}")

    # The events: each sample in the deployment's account, then the derived ones.
    events: list[tuple[str, dict[str, Any], str, str, dict[str, str]]] = []  # label, event, verdict, why, expected per variant
    for name, sample in samples.items():
        event = with_account(sample, account)
        verdict, why = explain(args.nth_lambda, event)
        want = "none" if verdict == "skipped" else "one"
        events.append((name, event, verdict, why, {v: want for v in VARIANTS}))
        events.append((f"{name} from another account", with_account(sample, OTHER_ACCOUNT), verdict, why, {v: "none" for v in VARIANTS}))
        group = sample.get("detail", {}).get("AutoScalingGroupName") if sample.get("source") == "aws.autoscaling" else None
        if group is not None:
            if group != GROUP:
                failures.add(f"{name}: a lifecycle sample of group {group!r}; rules.py filters on {GROUP!r}")
            other = copy.deepcopy(event)
            other["detail"]["AutoScalingGroupName"] = OTHER_GROUP
            other["resources"] = [r.replace(f"autoScalingGroupName/{group}", f"autoScalingGroupName/{OTHER_GROUP}") for r in other.get("resources", [])]
            verdict_o, why_o = explain(args.nth_lambda, other)
            events.append((f"{name} of another group", other, verdict_o, why_o, {"all-groups": "none" if verdict_o == "skipped" else "one", "named-groups": "none"}))

    matched_by_handled: dict[str, set[str]] = {}
    for variant, groups in VARIANTS.items():
        sources = {"template.yaml": template_rules(account, groups)}
        if plans:
            if variant not in plans:
                failures.add(f"no terraform plan for {variant}")
                continue
            sources["terraform/"] = plans[variant]
            # Rendered parity: the same patterns, rule for rule (by detail-type).
            by_type = {
                src: {json.dumps(p["detail-type"]): p for p in rules.values()} for src, rules in sources.items()
            }
            t, f = by_type["template.yaml"], by_type["terraform/"]
            for dt in sorted(set(t) | set(f)):
                if t.get(dt) != f.get(dt):
                    failures.add(f"{variant}: rule for {dt}: template.yaml renders {json.dumps(t.get(dt))}, terraform/ {json.dumps(f.get(dt))}")

        for src, rules in sources.items():
            matchers = {n: m for n, p in rules.items() if (m := matcher(f"{src} {n}", p, failures))}
            names = sorted(matchers)
            short = {n: f"R{i + 1}" for i, n in enumerate(names)}
            print(f"\n{src}, {variant} ({'AutoScalingGroupNames = ' + GROUP if groups else 'every group'}), account {account}:")
            for n in names:
                print(f"  {short[n]:>3} = {n}: {json.dumps(rules[n], separators=(',', ':'))}")
            width = max(len(e[0]) for e in events)
            print(f"  {'event':<{width}}  {' '.join(f'{short[n]:>3}' for n in names)}  nth-lambda explain")
            for label, event, verdict, why, expected in events:
                hits = [n for n in names if matchers[n].matches_event(event)]
                want = expected[variant]
                ok = (len(hits) == 1) if want == "one" else (not hits)
                if want == "one" and verdict != "skipped" and " from another " not in label:
                    for n in hits:
                        matched_by_handled.setdefault(f"{src} {variant}", set()).add(n)
                cells = " ".join(f"{'x' if n in hits else '.':>3}" for n in names)
                mark = "ok" if ok else "FAIL"
                print(f"  {label:<{width}}  {cells}  {verdict}: {why[:70]} -> want {want}: {mark}")
                if not ok:
                    failures.add(
                        f"{src} ({variant}): {label}: nth {verdict} it ({why}) so it should match "
                        f"{'exactly one rule' if want == 'one' else 'no rule'}, but it matches {hits or 'none'}"
                    )
            unmatched = set(names) - matched_by_handled.get(f"{src} {variant}", set())
            for n in sorted(unmatched):
                failures.add(f"{src} ({variant}): rule {n} matches no sample nth handles: add one to {SAMPLES.relative_to(ROOT)}")

    failures.finish(
        f"{len(samples)} samples (+ other-account and other-group copies) x the rules of "
        f"{'template.yaml and terraform/' if plans else 'template.yaml only (no terraform plan given)'}, "
        f"{len(VARIANTS)} group settings: every handled event matches one rule, every skipped one none"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Shared helpers of the deployment checks: the repository's paths, a CloudFormation-aware
YAML loader, and python-hcl2 output without its quoting."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "template.yaml"
TERRAFORM = ROOT / "terraform"
RBAC = ROOT / "deploy" / "rbac.yaml"
RBAC_NEEDS = ROOT / "deploy" / "rbac-needs.json"
LAMBDA_SRC = ROOT / "lambda" / "src"
# The settings the Lambda shares with the agent are read in core (core/src/settings.rs).
CORE_SRC = ROOT / "core" / "src"

# The Kubernetes group the access entry maps the role to and deploy/rbac.yaml binds.
KUBERNETES_GROUP = "nth-node-termination-handler"


class Failures:
    """Collects failures; `finish` prints them and exits non-zero if there were any."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.items: list[str] = []

    def add(self, message: str) -> None:
        self.items.append(message)

    def finish(self, ok_message: str) -> None:
        if self.items:
            print(f"{self.name}: FAILED", file=sys.stderr)
            for item in self.items:
                print(f"  - {item}", file=sys.stderr)
            sys.exit(1)
        print(f"{self.name}: ok: {ok_message}")


# --- CloudFormation YAML -------------------------------------------------------------------


def load_cfn(path: Path = TEMPLATE) -> dict[str, Any]:
    """template.yaml with the short-form intrinsics (!Ref, !Sub, ...) as their long forms."""
    import yaml  # from the deploy venv (PyYAML comes with aws-sam-cli and cfn-lint)

    class Loader(yaml.SafeLoader):
        pass

    def construct(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> dict[str, Any]:
        name = "Ref" if suffix == "Ref" else f"Fn::{suffix}"
        if isinstance(node, yaml.ScalarNode):
            value: Any = loader.construct_scalar(node)
            if suffix == "GetAtt":
                value = value.split(".", 1)
        elif isinstance(node, yaml.SequenceNode):
            value = loader.construct_sequence(node, deep=True)
        else:
            value = loader.construct_mapping(node, deep=True)
        return {name: value}

    Loader.add_multi_constructor("!", construct)
    with path.open(encoding="utf-8") as f:
        return yaml.load(f, Loader=Loader)  # noqa: S506 - a SafeLoader subclass


def cfn_resources(template: dict[str, Any]) -> dict[str, Any]:
    """The template's resources by logical id; a resource inside an `Fn::ForEach` loop
    (AWS::LanguageExtensions) appears once, under its logical-id template
    (`ClusterAccessEntry&{Cluster}`), with the loop's variable left as `!Ref Cluster`."""
    out: dict[str, Any] = {}

    def walk(section: dict[str, Any]) -> None:
        for key, value in section.items():
            if key.startswith("Fn::ForEach::"):
                _identifier, _collection, body = value
                walk(body)
            else:
                out[key] = value

    walk(template.get("Resources", {}))
    return out


def cfn_branches(value: Any) -> list[Any]:
    """Every value an `Fn::If` may produce (both branches, recursively); AWS::NoValue drops out."""
    if isinstance(value, dict) and set(value) == {"Fn::If"}:
        _, yes, no = value["Fn::If"]
        return cfn_branches(yes) + cfn_branches(no)
    if value == {"Ref": "AWS::NoValue"}:
        return []
    return [value]


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


# --- Terraform -----------------------------------------------------------------------------


def tf_files() -> list[Path]:
    return sorted(p for p in TERRAFORM.rglob("*.tf") if ".terraform" not in p.parts)


def unquote(value: Any) -> Any:
    """python-hcl2 (7 and later) keeps the quotes of string literals and block labels."""
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    if isinstance(value, list):
        return [unquote(v) for v in value]
    if isinstance(value, dict):
        return {
            unquote(k): unquote(v)
            for k, v in value.items()
            if k not in ("__is_block__", "__comments__", "__inline_comments__")
        }
    return value


def load_tf(path: Path) -> dict[str, Any]:
    import hcl2  # python-hcl2, from the deploy venv

    with path.open(encoding="utf-8") as f:
        return unquote(hcl2.load(f))


def tf_module() -> dict[str, dict[str, Any]]:
    """The root module's blocks merged over its .tf files: variable, locals, resource, data."""
    merged: dict[str, dict[str, Any]] = {"variable": {}, "locals": {}, "resource": {}, "data": {}, "output": {}}
    for path in sorted(TERRAFORM.glob("*.tf")):
        doc = load_tf(path)
        for block in doc.get("variable", []):
            merged["variable"].update(block)
        for block in doc.get("output", []):
            merged["output"].update(block)
        for block in doc.get("locals", []):
            merged["locals"].update(block)
        for kind in ("resource", "data"):
            for block in doc.get(kind, []):
                for type_, named in block.items():
                    for name, body in named.items():
                        merged[kind][f"{type_}.{name}"] = body
    return merged


def hcl_object_to_python(text: str) -> Any:
    """An HCL object/list literal of strings, as python-hcl2 prints it on one line
    (`{source = ["aws.ec2"], "detail-type" = ["..."]}`), as Python data."""
    import json

    converted = re.sub(r'([{,]\s*)([A-Za-z_][A-Za-z0-9_-]*|"[^"]+")\s*=\s*', lambda m: m.group(1) + '"' + m.group(2).strip('"') + '": ', text)
    return json.loads(converted)


def snake(name: str) -> str:
    """CamelCase -> snake_case: AutoScalingGroupNames -> auto_scaling_group_names."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()

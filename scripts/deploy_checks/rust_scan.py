"""What the function's Rust code asks of AWS and of its environment, read from the source.

- AWS calls: an operation is a call with no arguments on an AWS SDK client
  (`self.ec2.describe_instances()`, `asg.describe_tags()`), the start of a fluent builder
  that a later `.send()` sends. A client is any name declared or built with a type
  `aws_sdk_<service>::Client` (struct fields, arguments, `let x = aws_sdk_x::Client::new(..)`),
  or any receiver when the file uses only one SDK crate. Every `.send()` chain must resolve to
  an operation, or the scan fails: a call it cannot attribute is a permission it cannot check.
- AWS calls the code signs itself: the `action` field of a `SignedCall { .. }` literal
  (lambda/src/signed.rs), `action: "<IAM prefix>:<Operation>"`, e.g.
  `SignedCall { action: "eks:DescribeCluster", service: "eks", .. }`; an `action` that is not
  such a string literal fails the scan. Also an `x-amz-target` header
  `"<target prefix>.<Operation>"` (the JSON protocols), e.g.
  `("x-amz-target", "secretsmanager.GetSecretValue")`; its prefix must be one of
  TARGET_PREFIX's, or the scan fails.
- Environment variables: string literals passed to `get("X")`, `flag(get, "X")`,
  `number(&get, "X")`, `required(&get, "X", ..)`, `std::env::var("X")` and the like.

Comments, string contents and `#[cfg(test)]` modules are ignored for AWS calls.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

# aws_sdk_<crate> -> IAM service prefix, where they differ.
IAM_PREFIX = {
    "cloudwatchlogs": "logs",
    "elasticloadbalancingv2": "elasticloadbalancing",
    "sfn": "states",
}

# x-amz-target prefixes of the JSON-protocol services -> IAM service prefix.
TARGET_PREFIX = {
    "secretsmanager": "secretsmanager",
    "AmazonSQS": "sqs",
    "AmazonSSM": "ssm",
    "AWSEvents": "events",
    "Logs_20140328": "logs",
    "DynamoDB_20120810": "dynamodb",
    "AWSKeyManagementService": "kms",
    "AWSSecurityTokenServiceV20110615": "sts",
}

# Methods of an SDK client that are not operations.
CLIENT_METHODS = {"config", "clone", "from_conf", "new", "with_config"}

IDENT = re.compile(r"[A-Za-z0-9_]")


@dataclass(frozen=True)
class Call:
    service: str  # the crate suffix: ec2, autoscaling, ...
    operation: str  # snake_case: describe_instances
    file: str
    line: int

    @property
    def action(self) -> str:
        return f"{IAM_PREFIX.get(self.service, self.service)}:{operation_name(self.service, self.operation)}"


@dataclass(frozen=True)
class SignedCall:
    """A request the code signs and sends itself."""

    action: str
    file: str
    line: int


@dataclass
class Scan:
    calls: list[Call] = field(default_factory=list)
    signed: list[SignedCall] = field(default_factory=list)
    unresolved: list[str] = field(default_factory=list)
    env: dict[str, list[str]] = field(default_factory=dict)  # name -> where

    @property
    def actions(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for c in [*self.calls, *self.signed]:
            out.setdefault(c.action, []).append(f"{c.file}:{c.line}")
        return out


def pascal(snake_name: str) -> str:
    return "".join(part[:1].upper() + part[1:] for part in snake_name.split("_"))


def operation_name(service: str, operation: str) -> str:
    """The API's own name for an operation: from the SDK crate's source when cargo has it
    (`Metadata::new("DescribeInstances", "EC2")`), else the PascalCase of the method."""
    for src in sdk_sources(service):
        path = src / "operation" / f"{operation}.rs"
        if path.is_file():
            m = re.search(r'Metadata::new\(\s*"([A-Za-z0-9]+)"', path.read_text(encoding="utf-8"))
            if m:
                return m.group(1)
    return pascal(operation)


def sdk_operations(service: str) -> set[str] | None:
    """The operations the SDK crate defines (its src/operation/<op>/ modules), or None when
    cargo has not downloaded it."""
    for src in sdk_sources(service):
        ops = {p.name for p in (src / "operation").iterdir() if p.is_dir()}
        if ops:
            return ops
    return None


_SOURCES: dict[str, list[Path]] = {}


def sdk_sources(service: str) -> list[Path]:
    if service not in _SOURCES:
        home = Path(os.environ.get("CARGO_HOME", Path.home() / ".cargo"))
        version = locked_version(f"aws-sdk-{service}")
        found: list[Path] = []
        for registry in sorted((home / "registry" / "src").glob("*")):
            if version:
                candidate = registry / f"aws-sdk-{service}-{version}" / "src"
                if candidate.is_dir():
                    found.append(candidate)
        _SOURCES[service] = found
    return _SOURCES[service]


def locked_version(package: str) -> str | None:
    lock = Path(__file__).resolve().parents[2] / "Cargo.lock"
    if not lock.is_file():
        return None
    m = re.search(r'\[\[package\]\]\nname = "' + re.escape(package) + r'"\nversion = "([^"]+)"', lock.read_text(encoding="utf-8"))
    return m.group(1) if m else None


# --- lexing --------------------------------------------------------------------------------


def mask(text: str, keep_strings: bool = False) -> str:
    """The text with comments, and unless keep_strings the contents of string and char
    literals, blanked (same length, newlines kept), so structure can be read without being
    fooled by them."""
    out = list(text)
    i, n = 0, len(text)

    def blank(a: int, b: int, literal: bool = False) -> None:
        if literal and keep_strings:
            return
        for k in range(a, b):
            if out[k] != "\n":
                out[k] = " "

    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            blank(i, j)
            i = j
        elif text.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if text.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif text.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            blank(i, j)
            i = j
        elif c == "r" and re.match(r'r#*"', text[i:]) and (i == 0 or not IDENT.match(text[i - 1])):
            hashes = re.match(r"r(#*)\"", text[i:]).group(1)  # type: ignore[union-attr]
            start = i + 2 + len(hashes)
            end = text.find('"' + hashes, start)
            end = n if end < 0 else end
            blank(start, end, literal=True)
            i = end + 1 + len(hashes)
        elif c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            blank(i + 1, j, literal=True)
            i = j + 1
        elif c == "'":
            m = re.match(r"'(\\.|\\u\{[0-9a-fA-F]+\}|[^\\'])'", text[i:])
            if m:
                blank(i + 1, i + len(m.group(0)) - 1, literal=True)
                i += len(m.group(0))
            else:
                i += 1  # a lifetime
        else:
            i += 1
    return "".join(out)


def past_closing_brace(text: str, start: int) -> int:
    """The index just past the `}` closing the block whose `{` ends right before `start`."""
    depth, j = 1, start
    while j < len(text) and depth:
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
        j += 1
    return j


def test_modules(masked: str) -> list[tuple[int, int]]:
    """Where `#[cfg(test)] mod x { ... }` are (read in the masked text)."""
    ranges = []
    for m in re.finditer(r"#\[cfg\(test\)\]\s*(pub\s+)?mod\s+\w+\s*\{", masked):
        ranges.append((m.start(), past_closing_brace(masked, m.end())))
    return ranges


def blank_ranges(text: str, ranges: list[tuple[int, int]]) -> str:
    out = list(text)
    for a, b in ranges:
        for k in range(a, b):
            if out[k] != "\n":
                out[k] = " "
    return "".join(out)


def _skip_ws_back(text: str, i: int) -> int:
    while i >= 0 and text[i].isspace():
        i -= 1
    return i


def _chain_before(text: str, dot: int) -> list[tuple[str, str | None]]:
    """The method chain that ends at the `.` at `dot`, receiver first: (name, args) for
    calls, (name, None) for fields and variables."""
    chain: list[tuple[str, str | None]] = []
    i = _skip_ws_back(text, dot - 1)
    while i >= 0:
        args: str | None = None
        if text[i] == ")":
            depth, j = 1, i - 1
            while j >= 0 and depth:
                if text[j] == ")":
                    depth += 1
                elif text[j] == "(":
                    depth -= 1
                j -= 1
            args = text[j + 2 : i]
            i = _skip_ws_back(text, j)
            if i >= 1 and text[i] == ">" and "::<" in text[max(0, i - 80) : i]:  # turbofish
                i = _skip_ws_back(text, text.rfind("::<", 0, i) - 1)
        end = i
        while i >= 0 and IDENT.match(text[i]):
            i -= 1
        name = text[i + 1 : end + 1]
        if not name:
            break
        chain.append((name, args))
        i = _skip_ws_back(text, i)
        if i >= 0 and text[i] == "." and not text.startswith("..", i - 1):
            i = _skip_ws_back(text, i - 1)
            continue
        break
    chain.reverse()
    return chain


CLIENT_TYPE = r"(?:::)?aws_sdk_(\w+)::Client\b"


def scan(src: Path) -> Scan:
    result = Scan()
    root = src.parents[1]
    files = sorted(src.rglob("*.rs"))
    texts = {p: p.read_text(encoding="utf-8") for p in files}
    # structure: comments, literals and test modules blanked
    masked: dict[Path, str] = {}
    # code: comments and test modules blanked, string literals kept
    codes: dict[Path, str] = {}
    for p, t in texts.items():
        structure = mask(t)
        tests = test_modules(structure)
        masked[p] = blank_ranges(structure, tests)
        codes[p] = blank_ranges(mask(t, keep_strings=True), tests)

    # Names bound to clients, across the crate (fields are declared in one file, used in another).
    clients: dict[str, str] = {}
    aliases: dict[str, str] = {}
    for p, t in texts.items():
        code = codes[p]
        for m in re.finditer(r"use\s+aws_sdk_(\w+)::Client\s+as\s+(\w+)\s*;", code):
            aliases[m.group(2)] = m.group(1)
    for p, t in texts.items():
        code = codes[p]
        for m in re.finditer(r"\b(\w+)\s*:\s*&?\s*(?:mut\s+)?" + CLIENT_TYPE, code):
            clients[m.group(1)] = m.group(2)
        for m in re.finditer(r"\blet\s+(?:mut\s+)?(\w+)\s*(?::[^=]+)?=\s*" + CLIENT_TYPE + r"\s*::\s*(?:new|from_conf)\b", code):
            clients[m.group(1)] = m.group(2)
        for alias, service in aliases.items():
            for m in re.finditer(r"\b(\w+)\s*:\s*&?\s*" + alias + r"\b", code):
                clients[m.group(1)] = service

    seen: set[tuple[str, str, str]] = set()
    for p, t in texts.items():
        code = masked[p]
        rel = str(p.relative_to(root))
        crates = sorted(set(re.findall(r"\baws_sdk_(\w+)::", codes[p])))
        line_of = lambda pos: code.count("\n", 0, pos) + 1  # noqa: E731

        def record(service: str, op: str, pos: int) -> None:
            known = sdk_operations(service)
            if op in CLIENT_METHODS or (known is not None and op not in known):
                return
            key = (service, op, rel)
            if key not in seen:
                seen.add(key)
                result.calls.append(Call(service, op, rel, line_of(pos)))

        # 1. client.op() anywhere (builders kept in variables are sent later).
        for name, service in clients.items():
            for m in re.finditer(r"\b" + re.escape(name) + r"\s*\.\s*([a-z_][a-z0-9_]*)\s*\(\s*\)", code):
                if m.start() > 0 and code[m.start() - 1] == ":":
                    continue
                record(service, m.group(1), m.start(1))
        # 2. every .send(): its chain must start at an operation on a client.
        for m in re.finditer(r"\.\s*send\s*\(\s*\)", code):
            chain = _chain_before(code, m.start())
            resolved = False
            for k, (name, args) in enumerate(chain):
                if args is None or args.strip():
                    continue
                receiver = chain[k - 1][0] if k > 0 else None
                service = clients.get(receiver or "")
                if service is None and len(crates) == 1 and k > 0:
                    service = crates[0]
                if service is not None and name not in CLIENT_METHODS:
                    record(service, name, m.start())
                    resolved = True
                break
            if not resolved and not _sends_non_sdk(chain):
                text = " ".join(t[m.start() - 120 : m.end()].split())
                result.unresolved.append(f"{rel}:{line_of(m.start())}: cannot tell which AWS operation this .send() sends: ...{text[-100:]}")

    # Requests signed by hand: a SignedCall literal names its IAM action.
    for p, t in texts.items():
        code = codes[p]
        structure = masked[p]
        rel = str(p.relative_to(root))
        # In the structure text (strings blanked), so `struct SignedCall<'a> {` and a
        # `SignedCall {` inside a string or comment do not count; `{` right after the name
        # is a struct literal (or a pattern, which names the field the same way).
        for m in re.finditer(r"(?<![\w:])(?:\w+\s*::\s*)*SignedCall\s*\{", structure):
            if re.search(r"\b(?:struct|enum|impl|for)\s+$", structure[max(0, m.start() - 20) : m.start()]):
                continue
            j = past_closing_brace(structure, m.end())
            body = code[m.end() : j - 1]
            field_at = _top_level_field(structure[m.end() : j - 1], "action")
            line = code.count("\n", 0, m.start()) + 1
            if field_at is None:
                result.unresolved.append(f"{rel}:{line}: SignedCall literal without an `action` field")
                continue
            value = re.match(r'\s*"([a-z0-9-]+):([A-Z][A-Za-z0-9]*)"\s*(?:,|$)', body[field_at:])
            if value is None:
                text = " ".join(body[field_at : field_at + 80].split())
                result.unresolved.append(
                    f"{rel}:{line}: SignedCall action is not a literal \"<iam-prefix>:<Operation>\": {text}"
                )
                continue
            result.signed.append(SignedCall(f"{value.group(1)}:{value.group(2)}", rel, line))

    # Requests signed by hand: the JSON protocols name the operation in x-amz-target.
    for p, t in texts.items():
        code = codes[p]
        rel = str(p.relative_to(root))
        for m in re.finditer(r'"x-amz-target"\s*,\s*"([A-Za-z0-9_]+)\.([A-Za-z0-9]+)"', code, re.IGNORECASE):
            line = code.count("\n", 0, m.start()) + 1
            service = TARGET_PREFIX.get(m.group(1))
            if service is None:
                result.unresolved.append(f"{rel}:{line}: x-amz-target prefix {m.group(1)!r} is not in rust_scan.TARGET_PREFIX")
            else:
                result.signed.append(SignedCall(f"{service}:{m.group(2)}", rel, line))

    # Environment variables the code reads (not those of the test modules).
    for p, t in texts.items():
        code = codes[p]
        rel = str(p.relative_to(root))
        for m in re.finditer(
            r"(?:\bget\s*\(|\b(?:flag|flag_or|number|required|duration|list)\s*\(\s*&?\s*get\s*,|env::var(?:_os)?\s*\(|\bvar(?:_os)?\s*\()\s*\"([A-Z][A-Z0-9_]*)\"",
            code,
        ):
            result.env.setdefault(m.group(1), []).append(f"{rel}:{t.count(chr(10), 0, m.start()) + 1}")
    return result


def _top_level_field(body: str, name: str) -> int | None:
    """Where the value of field `name` starts in a struct literal's body (strings blanked),
    looking only at the literal's own fields, not those of nested literals."""
    depth = 0
    for m in re.finditer(r"[{}()\[\]]|\b" + re.escape(name) + r"\s*:(?!:)", body):
        token = m.group(0)
        if token in "{([":
            depth += 1
        elif token in "})]":
            depth -= 1
        elif depth == 0 and body[: m.start()].rstrip()[-1:] in ("", ","):
            return m.end()
    return None


def _sends_non_sdk(chain: list[tuple[str, str | None]]) -> bool:
    """reqwest and similar: `client.post(url).json(&body).send()` - a call with arguments
    right on the receiver, not an SDK operation."""
    return any(args is not None and args.strip() for _, args in chain[:2]) and not any(
        args is not None and not args.strip() for _, args in chain[1:2]
    )


if __name__ == "__main__":
    import json
    import sys

    src = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[2] / "lambda" / "src"
    s = scan(src)
    print(json.dumps({"actions": s.actions, "unresolved": s.unresolved, "env": s.env}, indent=2))

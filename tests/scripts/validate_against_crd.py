#!/usr/bin/env python3
"""Validate custom resources against the schema of their CustomResourceDefinition.

    validate_against_crd.py CRD_FILE CR_FILE...

`kubernetes-validate` knows only built-in kinds; for a Conference it merely warns. This script
checks what the API server would check with `kubectl apply --validate=strict`, short of CEL rules
(those run client-side in `chorus-operator plan`):

- the document's apiVersion/kind are a served version and the kind of the CRD;
- the document matches that version's openAPIV3Schema: types, ranges, enums, patterns, required
  fields, and no unknown fields (an object with `properties` and no `additionalProperties` or
  `x-kubernetes-preserve-unknown-fields` accepts nothing else, as the API server prunes or, in strict
  mode, rejects the rest).

Exit status: 0 when every document is valid, 1 when one is not (each error on stderr with its path),
2 on unusable input. Needs PyYAML and jsonschema: run it with .venv/bin/python (scripts/bootstrap).
"""

import copy
import sys

import jsonschema
import yaml


def to_json_schema(node):
    """Turn an OpenAPI v3 structural schema into a draft-4 JSON schema with strict objects.

    Draft 4 because OpenAPI 3.0 schemas use its boolean `exclusiveMinimum`/`exclusiveMaximum`.
    """
    if isinstance(node, list):
        return [to_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node

    out = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-") or key == "nullable":
            continue
        if key in ("properties", "patternProperties", "definitions"):
            out[key] = {name: to_json_schema(sub) for name, sub in value.items()}
        elif key in ("default", "enum", "example"):
            # Values, not schemas: a property named like a keyword must not be rewritten.
            out[key] = copy.deepcopy(value)
        else:
            out[key] = to_json_schema(value)

    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]

    if node.get("nullable"):
        if isinstance(out.get("type"), str):
            out["type"] = [out["type"], "null"]
        if "enum" in out and None not in out["enum"]:
            out["enum"] = out["enum"] + [None]

    if (
        "properties" in node
        and "additionalProperties" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def load_yaml_documents(path):
    try:
        with open(path, encoding="utf-8") as f:
            return [doc for doc in yaml.safe_load_all(f) if doc is not None]
    except (OSError, yaml.YAMLError) as err:
        print(f"{path}: cannot read YAML: {err}", file=sys.stderr)
        sys.exit(2)


def load_crd(path):
    crds = [d for d in load_yaml_documents(path) if d.get("kind") == "CustomResourceDefinition"]
    if len(crds) != 1:
        print(f"{path}: expected exactly one CustomResourceDefinition, found {len(crds)}", file=sys.stderr)
        sys.exit(2)
    crd = crds[0]
    spec = crd.get("spec", {})
    group, kind = spec.get("group"), spec.get("names", {}).get("kind")
    schemas = {}
    for version in spec.get("versions", []):
        if not version.get("served", False):
            continue
        schema = version.get("schema", {}).get("openAPIV3Schema")
        if schema is None:
            print(f"{path}: version {version.get('name')} has no openAPIV3Schema", file=sys.stderr)
            sys.exit(2)
        schema = to_json_schema(schema)
        # The API server accepts these at the root of every object whether or not the CRD's schema
        # lists them (kube-derived schemas list only spec and status); metadata has its own checks.
        implicit = {"apiVersion": {"type": "string"}, "kind": {"type": "string"}, "metadata": {"type": "object"}}
        for field, field_schema in implicit.items():
            schema.setdefault("properties", {}).setdefault(field, field_schema)
        schemas[f"{group}/{version['name']}"] = schema
    if not group or not kind or not schemas:
        print(f"{path}: the CRD names no group, kind or served version", file=sys.stderr)
        sys.exit(2)
    return kind, schemas


def describe_path(error):
    path = ""
    for part in error.absolute_path:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "<document>"


def validate_file(path, kind, schemas):
    """Returns the error messages for every document of one file."""
    failures = []
    for index, doc in enumerate(load_yaml_documents(path), start=1):
        if not isinstance(doc, dict):
            failures.append(f"{path}: document {index}: not a mapping")
            continue
        name = (doc.get("metadata") or {}).get("name", "<unnamed>")
        where = f"{path}: document {index} ({doc.get('kind')} {name})"
        if doc.get("kind") != kind:
            failures.append(f"{where}: kind must be {kind}")
            continue
        schema = schemas.get(doc.get("apiVersion"))
        if schema is None:
            served = ", ".join(sorted(schemas))
            failures.append(f"{where}: apiVersion {doc.get('apiVersion')!r} is not served (served: {served})")
            continue
        if not name or name == "<unnamed>":
            failures.append(f"{where}: metadata.name is required")
        validator = jsonschema.Draft4Validator(schema)
        for error in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path))):
            failures.append(f"{where}: {describe_path(error)}: {error.message}")
    return failures


def main(argv):
    if len(argv) < 3:
        print("usage: validate_against_crd.py CRD_FILE CR_FILE...", file=sys.stderr)
        return 2
    kind, schemas = load_crd(argv[1])
    failures = []
    for path in argv[2:]:
        failures += validate_file(path, kind, schemas)
    for failure in failures:
        print(f"INVALID {failure}", file=sys.stderr)
    if failures:
        return 1
    print(f"OK {len(argv) - 2} file(s) match the {kind} schema of {argv[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

"""botocore's data files, loaded without what the proxy never reads: the resident size of every worker's S3 client.

botocore parses `endpoints.json` (every AWS service in every region: 6.7 MiB of dicts once parsed) to resolve
one service, and each service model carries its API reference (`documentation`: 1.2 of S3's 3.2 MiB), which
only help() and generated docs read. The zygote parses them before it forks the workers (origin.share_models), so they
sit in every process's resident memory. This loader keeps, of the endpoint data, each partition's regions and
defaults and only the services a proxy opens clients for, and drops the reference text from every model.

The hook is botocore's own: `Loader(file_loader=...)` takes any object with JSONFileLoader's `exists` and
`load_file`. A service missing from the pruned endpoint data resolves through its partition's defaults, as any
service that endpoints.json does not list does.
"""

from __future__ import annotations

import os
from typing import Any

from botocore.loaders import JSONFileLoader, Loader

__all__ = ["S3_OPERATIONS", "SERVICES", "loader"]

# s3 for objects, sqs for event notifications; sts, sso and sso-oidc for the credentials a profile may name.
SERVICES = frozenset({"s3", "sqs", "sts", "sso", "sso-oidc"})
# The S3 operations origin.py calls. A client's class gets a method per operation of its model: keeping these
# three of S3's ~110 halves the parsed model (3.6 -> 1.8 MiB with the above) and what a worker's first client
# copies of the supervisor's pages (8.0 -> 7.1 MiB). Calling any other operation raises AttributeError, which
# every origin test would show.
S3_OPERATIONS = frozenset({"GetObject", "HeadObject", "ListObjectsV2"})


def _without_documentation(node: Any) -> Any:
    if isinstance(node, dict):
        for name in ("documentation", "documentationUrl"):
            if name in node:  # emptied, not removed: botocore reads some of them with [] (clientContextParams)
                node[name] = ""
        for value in node.values():
            _without_documentation(value)
    elif isinstance(node, list):
        for value in node:
            _without_documentation(value)
    return node


def _only_services(endpoints: Any) -> Any:
    for partition in endpoints.get("partitions", ()):
        services = partition.get("services")
        if isinstance(services, dict):
            partition["services"] = {name: data for name, data in services.items() if name in SERVICES}
    return endpoints


def _only_operations(model: Any, operations: frozenset[str]) -> Any:
    """The model with only `operations` and the shapes they reach (inputs, outputs, errors, recursively)."""
    kept_ops = {name: op for name, op in model["operations"].items() if name in operations}
    shapes = model["shapes"]
    wanted = [ref["shape"] for op in kept_ops.values()
              for ref in (op.get("input"), op.get("output"), *op.get("errors", ())) if ref]
    kept: dict[str, Any] = {}
    while wanted:
        name = wanted.pop()
        if name in kept:
            continue
        shape = kept[name] = shapes[name]
        wanted += [member["shape"] for member in shape.get("members", {}).values()]
        wanted += [shape[part]["shape"] for part in ("member", "key", "value") if part in shape]
    model["operations"], model["shapes"] = kept_ops, kept
    return model


class _PruningFileLoader(JSONFileLoader):  # type: ignore[misc]
    def load_file(self, file_path: str) -> Any:
        data = super().load_file(file_path)
        if data is None:
            return None
        name = os.path.basename(file_path)
        if name == "endpoints":
            return _only_services(data)
        if name == "service-2":
            _without_documentation(data)
            if data.get("metadata", {}).get("endpointPrefix") == "s3":
                _only_operations(data, S3_OPERATIONS)
            return data
        return data


def loader(data_path: str | None) -> Loader:
    """A Loader searching what botocore.loaders.create_loader(data_path) would (AWS_DATA_PATH first), pruning."""
    extra = [os.path.expanduser(os.path.expandvars(p)) for p in data_path.split(os.pathsep)] if data_path else None
    return Loader(extra_search_paths=extra, file_loader=_PruningFileLoader())

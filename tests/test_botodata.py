"""botocore's data without what the proxy never reads (botodata.py): smaller, and every client it makes resolves
the same endpoints as botocore's own loader."""

from __future__ import annotations

import botocore.session
import pytest

from cachingproxy import botodata

_REGIONS = ("us-east-1", "eu-west-3", "ap-southeast-2", "cn-north-1", "us-gov-west-1")


def _session(pruned: bool) -> botocore.session.Session:
    session = botocore.session.Session()
    if pruned:
        session.register_component("data_loader", botodata.loader(session.get_config_variable("data_path")))
    return session


@pytest.mark.parametrize("service", ["s3", "sqs", "sts"])
def test_clients_resolve_the_endpoints_botocore_resolves(service: str) -> None:
    """Endpoint URL, signing region and signature version, region by region, with and without the pruning."""
    ours, theirs = _session(True), _session(False)
    for region in _REGIONS:
        a, b = (s.create_client(service, region_name=region, aws_access_key_id="k", aws_secret_access_key="s")
                for s in (ours, theirs))
        assert (a.meta.endpoint_url, a.meta.region_name, a.meta.config.signature_version) == \
            (b.meta.endpoint_url, b.meta.region_name, b.meta.config.signature_version), (service, region)


def test_endpoint_data_keeps_only_the_services_a_proxy_opens_and_models_lose_their_reference_text() -> None:
    loader = botodata.loader(None)
    endpoints = loader.load_data("endpoints")
    full = botocore.session.Session().get_component("data_loader").load_data("endpoints")
    assert [p["partition"] for p in endpoints["partitions"]] == [p["partition"] for p in full["partitions"]]
    for ours, theirs in zip(endpoints["partitions"], full["partitions"], strict=True):
        assert set(ours["services"]) == botodata.SERVICES & set(theirs["services"])
        assert ours["regions"] == theirs["regions"] and ours["defaults"] == theirs["defaults"]
    model = loader.load_service_model("s3", "service-2")
    get_object = model["operations"]["GetObject"]
    assert get_object["documentation"] == "" and get_object["http"]["method"] == "GET"
    assert all(shape.get("documentation", "") == "" for shape in model["shapes"].values())


def test_the_s3_model_keeps_the_operations_origin_calls_and_every_shape_they_reach() -> None:
    session = _session(True)
    client = session.create_client("s3", region_name="us-east-1", aws_access_key_id="k", aws_secret_access_key="s")
    model = client.meta.service_model
    assert set(model.operation_names) == botodata.S3_OPERATIONS
    assert not hasattr(client, "put_object")

    def walk(shape: object, seen: set[str]) -> None:  # botocore resolves each shape by name: a missing one raises
        name = getattr(shape, "name", "")
        if shape is None or name in seen:
            return
        seen.add(name)
        for child in [*getattr(shape, "members", {}).values(),
                      *(getattr(shape, part, None) for part in ("member", "key", "value"))]:
            walk(child, seen)

    for name in botodata.S3_OPERATIONS:
        operation = model.operation_model(name)
        for shape in (operation.input_shape, operation.output_shape, *operation.error_shapes):
            walk(shape, set())
        assert getattr(client, {"GetObject": "get_object", "HeadObject": "head_object",
                                "ListObjectsV2": "list_objects_v2"}[name])

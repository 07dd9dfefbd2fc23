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

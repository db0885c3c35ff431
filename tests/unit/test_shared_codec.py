"""The shared tier's codec, key space, size bound and wall-clock grid (no Redis)."""

from __future__ import annotations

import dataclasses
import math

import pytest

from app.gateway.caching.clock import grid_expiry
from app.gateway.caching.codec import Codec, CodecError
from app.gateway.caching.shared import FORMAT_VERSION, KeySpace, catalog_fingerprint
from app.gateway.catalog.loader import load_catalog
from app.gateway.result import Fetched, Sample, UpstreamFailure
from app.gateway.settings import GatewaySettings

ANSWER = Fetched(
    (Sample((("provider", "openai"), ("model", "gpt-4o")), 12.5),
     Sample((("provider", "anthropic"), ("model", "claude-3")), 0.1 + 0.2),
     Sample((), float("nan")), Sample((("x", "é✓"),), float("inf")), Sample((), float("-inf"))),
    1763900000.123456,
)


def test_round_trip_keeps_labels_values_and_fetched_at_exactly() -> None:
    codec = Codec()
    data = codec.encode(ANSWER, expires_at=1763900015.0)
    assert data is not None
    back, expires_at = codec.decode(data)
    assert expires_at == 1763900015.0
    assert back.fetched_at == ANSWER.fetched_at
    assert [s.labels for s in back.samples] == [s.labels for s in ANSWER.samples]
    for got, want in zip(back.samples, ANSWER.samples, strict=True):
        assert got.value == want.value or (math.isnan(got.value) and math.isnan(want.value))
    assert back.warnings == ()


def test_warnings_survive_and_encoding_is_json_never_pickle() -> None:
    codec = Codec(compress_min_bytes=10**9)
    data = codec.encode(dataclasses.replace(ANSWER, warnings=("PromQL info: x",)))
    assert data is not None and data[:1] == b"J"
    assert b"NaN" not in data  # standard JSON: non-finite values travel as strings
    assert codec.decode(data)[0].warnings == ("PromQL info: x",)
    with pytest.raises(CodecError):
        codec.decode(b"\x80\x04\x95" + data[1:])  # a pickle header is not an entry


def test_compressed_only_when_it_pays() -> None:
    many = Fetched(tuple(Sample((("provider", f"p{i}"), ("model", "m")), float(i)) for i in range(200)), 1.0)
    codec = Codec(compress_min_bytes=256)
    data = codec.encode(many)
    assert data is not None and data[:1] == b"Z"
    assert len(data) < len(Codec(compress_min_bytes=10**9).encode(many) or b"") / 3
    assert codec.decode(data)[0] == many
    tiny = Fetched((Sample((), 1.0),), 2.0)
    assert (codec.encode(tiny) or b"")[:1] == b"J"  # below the threshold: plain


def test_size_bound_refuses_large_answers() -> None:
    rng = Fetched(tuple(Sample((("id", f"{i * 7919 % 100003:x}{i}"),), i * 1.1) for i in range(3000)), 1.0)
    assert Codec(max_bytes=4096).encode(rng) is None
    assert Codec(max_bytes=10**7).encode(rng) is not None


@pytest.mark.parametrize("garbage", [b"", b"J", b"Jnot json", b"Z\x00\x01", b'J{"t":1}', b"Q{}",
                                     b'J{"t":1,"s":[[["a"],"x"]]}'])
def test_garbage_is_a_codec_error(garbage: bytes) -> None:
    with pytest.raises(CodecError):
        Codec().decode(garbage)


def test_failures_and_too_large_markers() -> None:
    codec = Codec()
    f = UpstreamFailure("timeout", "x" * 2000)
    back = codec.decode_outcome(codec.encode_failure(f))
    assert isinstance(back, UpstreamFailure) and back.error_type == "timeout" and len(back.message) == 500
    assert codec.decode_outcome(b"B") is None
    data = codec.encode(ANSWER)
    assert data is not None
    got = codec.decode_outcome(data)
    assert isinstance(got, tuple) and got[0].fetched_at == ANSWER.fetched_at


def _tag(key: str) -> str:
    return key[key.index("{") + 1:key.index("}")]


def test_keys_are_namespaced_versioned_and_slot_tagged() -> None:
    ks = KeySpace("mg", "abc123")
    k = ks.figure("t1|provider|sum(x)")
    assert k.fresh.startswith(f"mg:v{FORMAT_VERSION}:abc123:{{{k.tag}}}:fresh:")
    # One hash tag per tenant and catalog: a request's batch shares a Redis Cluster slot
    # (one script call), whatever its figures.
    assert {_tag(key) for key in (k.fresh, k.good, k.lock, k.res)} == {k.tag}
    assert ks.figure("t1|provider|sum(y)").tag == k.tag
    assert ks.figure("t2|provider|sum(x)").tag != k.tag
    assert KeySpace("mg", "def456").figure("t1|provider|sum(x)").tag != k.tag
    assert ks.figure("t1|provider|sum(x)") == k
    assert ks.figure("t1|provider|sum(y)").fresh != k.fresh
    assert KeySpace("mg", "def456").figure("t1|provider|sum(x)").fresh != k.fresh
    assert KeySpace("mg", "abc123", version=FORMAT_VERSION + 1).figure("t1|provider|sum(x)").fresh != k.fresh


def test_range_keys_spread_over_every_slot() -> None:
    """Range extents, remembered answers and their flights carry their own key's tag:
    their four keys share a slot (one script), different keys land all over the slots."""
    from redis.crc import key_slot

    ks = KeySpace("mg", "abc123")
    one = ks.of("range:b1")
    assert {_tag(key) for key in (one.fresh, one.good, one.lock, one.res)} == {one.tag}
    slots = {key_slot(ks.of(f"range:b{i}").fresh.encode()) for i in range(2000)}
    # 2000 keys over 16384 slots: a per-namespace tag would give 1; a per-key one ~1900.
    assert len(slots) > 1800
    thirds = [sum(1 for s in slots if s * 3 // 16384 == m) for m in range(3)]
    assert max(thirds) < 0.4 * len(slots)  # three masters' slot ranges get a third each


def test_catalog_fingerprint_follows_what_shapes_answers() -> None:
    catalog = load_catalog()
    base = catalog_fingerprint(catalog)
    assert base == catalog_fingerprint(load_catalog())
    qid, q = next(iter(catalog.queries.items()))
    changed = dataclasses.replace(catalog, queries={**catalog.queries,
                                                    qid: dataclasses.replace(q, expr=q.expr + " * 1")})
    assert catalog_fingerprint(changed) != base
    relabelled = dataclasses.replace(catalog, queries={**catalog.queries,
                                                       qid: dataclasses.replace(q, labels=(*q.labels, "zz"))})
    assert catalog_fingerprint(relabelled) != base
    reworded = dataclasses.replace(catalog, queries={**catalog.queries, qid: dataclasses.replace(q, help="other")})
    assert catalog_fingerprint(reworded) == base  # help text does not change an answer


def test_wall_clock_grid_agrees_across_processes() -> None:
    # Two processes fetching at different moments of one step expire together.
    assert grid_expiry(15, 1006.0) == grid_expiry(15, 1013.0) == 1020.0
    assert grid_expiry(15, 1019.0) == 1035.0  # last tenth: kept to the end of the next step
    assert grid_expiry(0, 1000.0) == 1000.0


def test_settings_switch_the_tier_off_explicitly() -> None:
    assert GatewaySettings().shared_cache_url is None
    assert GatewaySettings(gateway_cache_url="redis://127.0.0.1:1/0").shared_cache_url == "redis://127.0.0.1:1/0"
    for off in ("", "off", "none"):
        assert GatewaySettings(gateway_cache_url=off).shared_cache_url is None

"""A stand-in vROps Suite API, faithful to /work/shared/reference/vrops-suite-api.md.

- POST /suite-api/api/auth/token/acquire -> {token, validity (epoch ms), expiresAt, roles}
- every other call needs `Authorization: vRealizeOpsToken <token>`; an expired or
  unknown token answers 401 with apiErrorCode 1512
- GET  /suite-api/api/resources?resourceKind=&page=&pageSize=   (paged resourceList)
- POST /suite-api/api/resources/bulk/relationships              (paged resourcesRelations)
- POST /suite-api/api/resources/stats/latest/query              (<= 1,000 ids, else 400)

Size: N clusters x M objects (hosts, VMs, datastores) each with the known stat keys.
Failure modes (POST /_control {"mode": ...}): "ok", "down" (503 everywhere),
"unauthorized" (401 apiErrorCode 1512 forever, even for fresh tokens), "bad_credentials"
(token acquire 401). GET /_control returns counters. Also `token_ttl_seconds` and
`delay_seconds` can be changed there.

Run standalone: FAKE_VROPS_CLUSTERS=50 FAKE_VROPS_OBJECTS=500 \
    python -m uvicorn tests.fakes.vrops_server:app_from_env --factory --port 9999
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import time
import uuid
import zlib
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

API = "/suite-api/api"
MAX_IDS = 1000
STAT_KEYS = ["cpu|usage_average", "mem|usage_average", "diskspace|used",
             "diskspace|total_capacity", "badge|health", "cpu|demandmhz",
             "mem|consumed_average"]
NS = uuid.UUID("6f0b7f3e-1d2c-4c8e-9a55-000000000000")


@dataclass
class FakeResource:
    identifier: str
    name: str
    kind: str
    cluster_id: str | None
    seed: int

    def json(self) -> dict[str, Any]:
        return {
            "identifier": self.identifier,
            "resourceKey": {"name": self.name, "adapterKindKey": "VMWARE",
                            "resourceKindKey": self.kind, "resourceIdentifiers": []},
            "resourceStatusStates": [], "badges": [], "dtEnabled": True,
        }


@dataclass
class FakeVrops:
    clusters: int = 3
    objects_per_cluster: int = 10
    username: str = "admin"
    password: str = "s3cret"
    token_ttl_seconds: float = 1800.0
    mode: str = "ok"
    delay_seconds: float = 0.0
    sample_lag_seconds: float = 0.0
    tokens: dict[str, float] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)
    resources: dict[str, FakeResource] = field(default_factory=dict)
    by_kind: dict[str, list[FakeResource]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.build()

    def build(self) -> None:
        self.resources.clear()
        self.by_kind = {k: [] for k in ("ClusterComputeResource", "HostSystem",
                                        "VirtualMachine", "Datastore")}
        hosts = max(1, self.objects_per_cluster // 50)
        datastores = max(1, self.objects_per_cluster // 50)
        for c in range(self.clusters):
            cname = f"cluster-{c:03d}"
            cid = str(uuid.uuid5(NS, cname))
            self._add(FakeResource(cid, cname, "ClusterComputeResource", None, c))
            for o in range(self.objects_per_cluster):
                if o < hosts:
                    kind, name = "HostSystem", f"esx-{c:03d}-{o:02d}"
                elif o < hosts + datastores:
                    kind, name = "Datastore", f"ds-{c:03d}-{o - hosts:02d}"
                else:
                    kind, name = "VirtualMachine", f"vm-{c:03d}-{o:04d}"
                rid = str(uuid.uuid5(NS, name))
                self._add(FakeResource(rid, name, kind, cid, zlib.crc32(name.encode())))

    def _add(self, r: FakeResource) -> None:
        self.resources[r.identifier] = r
        self.by_kind[r.kind].append(r)

    def count(self, what: str) -> None:
        self.counters[what] = self.counters.get(what, 0) + 1

    def value(self, r: FakeResource, key: str) -> float:
        s = (r.seed + zlib.crc32(key.encode())) % 1000
        if key in ("cpu|usage_average", "mem|usage_average", "badge|health"):
            return round(s / 10.0, 2)  # percent / score 0..100
        if key == "diskspace|used":
            return round(s / 4.0, 2)  # GB
        if key == "diskspace|total_capacity":
            return 500.0  # GB
        if key == "cpu|demandmhz":
            return float(s * 3)
        return float(s * 1024)  # KB


def _json(data: Any, status: int = 200) -> Response:
    return Response(json.dumps(data, separators=(",", ":")), status_code=status,
                    media_type="application/json")


def _error(status: int, message: str, code: int | None = None) -> Response:
    body: dict[str, Any] = {"message": message, "httpStatusCode": status}
    if code is not None:
        body["apiErrorCode"] = code
    return _json(body, status)


def create_app(state: FakeVrops | None = None) -> Starlette:
    st = state or FakeVrops()

    async def gate(request: Request, auth: bool = True) -> Response | None:
        if st.delay_seconds:
            await asyncio.sleep(st.delay_seconds)
        if st.mode == "down":
            st.count("refused_down")
            return _error(503, "Service Unavailable")
        if not auth:
            return None
        header = request.headers.get("authorization", "")
        token = header.removeprefix("vRealizeOpsToken ").strip()
        expiry = st.tokens.get(token)
        if st.mode == "unauthorized" or expiry is None or expiry <= time.time():
            st.count("unauthorized")
            return _error(401, "The provided token for auth scheme \"vRealizeOpsToken\" is "
                               "either invalid or has expired.", 1512)
        return None

    async def acquire(request: Request) -> Response:
        if (resp := await gate(request, auth=False)) is not None:
            return resp
        body = await request.json()
        if (st.mode == "bad_credentials" or body.get("username") != st.username
                or body.get("password") != st.password):
            st.count("acquire_refused")
            return _error(401, "Invalid credentials", 1011)
        st.count("acquire")
        token = f"{uuid.uuid4()}::{secrets.token_hex(8)}"
        validity = time.time() + st.token_ttl_seconds
        st.tokens[token] = validity
        return _json({"token": token, "validity": int(validity * 1000),
                      "expiresAt": time.strftime("%A, %B %d, %Y at %I:%M:%S %p %Z",
                                                 time.gmtime(validity)),
                      "roles": []})

    def paging(request: Request) -> tuple[int, int]:
        page = int(request.query_params.get("page", "0"))
        size = min(int(request.query_params.get("pageSize", "1000")), 5000)
        return page, size

    async def resources(request: Request) -> Response:
        if (resp := await gate(request)) is not None:
            return resp
        st.count("resources")
        kinds = request.query_params.getlist("resourceKind")
        items = [r for k in kinds for r in st.by_kind.get(k, [])] if kinds else list(
            st.resources.values())
        page, size = paging(request)
        chunk = items[page * size:(page + 1) * size]
        return _json({"pageInfo": {"totalCount": len(items), "page": page, "pageSize": size},
                      "links": [], "resourceList": [r.json() for r in chunk]})

    async def relationships(request: Request) -> Response:
        if (resp := await gate(request)) is not None:
            return resp
        st.count("relationships")
        body = await request.json()
        if body.get("relationshipType") not in ("DESCENDANT", "CHILD", "ALL"):
            return _error(400, "unsupported relationshipType")
        parents = set(body.get("resourceIds") or [])
        kinds = set((body.get("resourceQuery") or {}).get("resourceKind") or [])
        items = [r for r in st.resources.values()
                 if r.cluster_id in parents and (not kinds or r.kind in kinds)]
        page, size = paging(request)
        chunk = items[page * size:(page + 1) * size]
        return _json({
            "pageInfo": {"totalCount": len(items), "page": page, "pageSize": size},
            "relationshipType": body["relationshipType"],
            "resourcesRelations": [
                {"resource": r.json(), "relatedResources": [r.cluster_id],
                 "relationshipType": body["relationshipType"]} for r in chunk],
        })

    async def stats_latest(request: Request) -> Response:
        if (resp := await gate(request)) is not None:
            return resp
        body = await request.json()
        ids = body.get("resourceId") or []
        if len(ids) > MAX_IDS:
            st.count("stats_too_many")
            return _error(400, f"resourceId: at most {MAX_IDS} ids per request", 1500)
        st.count("stats")
        keys = body.get("statKey") or STAT_KEYS
        now_ms = int((time.time() - st.sample_lag_seconds) * 1000)
        values = []
        for rid in ids:
            r = st.resources.get(rid)
            if r is None:
                continue
            values.append({"resourceId": rid, "stat-list": {"stat": [
                {"timestamps": [now_ms], "statKey": {"key": k}, "data": [st.value(r, k)]}
                for k in keys if k in STAT_KEYS]}})
        return _json({"values": values})

    async def control(request: Request) -> Response:
        if request.method == "POST":
            body = await request.json()
            for k in ("mode", "token_ttl_seconds", "delay_seconds", "sample_lag_seconds"):
                if k in body:
                    setattr(st, k, body[k])
            if body.get("expire_tokens"):
                st.tokens.clear()
        return _json({"mode": st.mode, "counters": st.counters,
                      "resources": len(st.resources)})

    app = Starlette(routes=[
        Route(f"{API}/auth/token/acquire", acquire, methods=["POST"]),
        Route(f"{API}/resources", resources, methods=["GET"]),
        Route(f"{API}/resources/bulk/relationships", relationships, methods=["POST"]),
        Route(f"{API}/resources/stats/latest/query", stats_latest, methods=["POST"]),
        Route("/_control", control, methods=["GET", "POST"]),
        Route("/health", lambda r: _json({"ok": True}), methods=["GET"]),
    ])
    app.state.fake = st
    return app


def app_from_env() -> Starlette:
    return create_app(FakeVrops(
        clusters=int(os.environ.get("FAKE_VROPS_CLUSTERS", "3")),
        objects_per_cluster=int(os.environ.get("FAKE_VROPS_OBJECTS", "10")),
        token_ttl_seconds=float(os.environ.get("FAKE_VROPS_TOKEN_TTL", "1800")),
    ))

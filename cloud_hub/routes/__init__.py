"""The hub's HTTP routes, one router per resource; ``cloud_hub.api.create_app`` assembles them.

    ops        GET    /healthz                                   -         database reachable
               GET    /metrics                                   -         Prometheus text
    tokens     GET    /api/v1/whoami                             viewer
               GET    /api/v1/tokens                             admin
               POST   /api/v1/tokens                             admin     answers the secret once
               DELETE /api/v1/tokens/{name}                      admin
    registry   POST   /api/v1/uploads?force=                     operator (force: admin)  body: manifest.json
               GET    /api/v1/uploads/{id}                       operator
               PUT    /api/v1/uploads/{id}/pieces/{piece}        operator  body: the piece's bytes
               POST   /api/v1/uploads/{id}/commit                operator
               GET    /api/v1/releases?model=                    viewer
               GET    /api/v1/releases/{model}/{version}         viewer
               GET    /api/v1/releases/{model}/{version}/bundles/{profile}/manifest   viewer
    devices    GET    /api/v1/devices?selector=k=v,...&online=   viewer
               GET    /api/v1/devices/{id}                       viewer
               PUT    /api/v1/devices/{id}/pin                   operator
               DELETE /api/v1/devices/{id}/pin                   operator
               PATCH  /api/v1/devices/{id}/labels                operator
               PUT    /api/v1/devices/{id}/http-access           operator  body: {"allowed": bool}
    audit      GET    /api/v1/audit?actor=&action=&target=&limit=   viewer
    trust      GET    /api/v1/trust/root                         viewer    the newest root: key ids by role
               GET    /api/v1/trust/roots                        viewer    every root version, as signed
               POST   /api/v1/trust/roots                        admin     body: the next root, signed
    rollouts   POST   /api/v1/rollouts                           operator  body: DeployBody (dry_run;
                                                                           force, admin: a failed gate)
               GET    /api/v1/rollouts?state=                    viewer
               GET    /api/v1/rollouts/{id}?devices=             viewer
               POST   /api/v1/rollouts/{id}/pause|resume|abort   operator
               POST   /api/v1/rollbacks                          operator
    pieces     GET    /api/v1/pieces/{piece}?model=&version=&profile=          a device's credential
               GET    /api/v1/pieces/{piece}/delta/{base}?...&have=            (HEAD too; no token)
    (ui)       GET    /ui/...                                    session   the dashboard: not a router
                                                                           here, mounted by server.load_app;
                                                                           its table is in cloud_hub.ui

Request bodies and answers are the models of :mod:`edgeglm.hub_api`, which ``edgectl`` decodes
with too; ``deps`` holds what the routes take from a request (context, caller, bounded body).
Every /api/v1 route needs a bearer token (an API token; the piece routes: a device's HTTP
credential instead); :class:`cloud_hub.guard.Guard` checks it, the role in this table and the
body's size (JSON bodies 64 KiB; a manifest 32 MiB, a piece the hub's piece
cap, a root 64 KiB) before the body is read.
"""

from __future__ import annotations

from fastapi import APIRouter

from cloud_hub.routes import audit, devices, ops, pieces, registry, rollouts, tokens, trust

__all__ = ["ROUTERS"]

ROUTERS: tuple[APIRouter, ...] = (
    ops.router,
    tokens.router,
    registry.router,
    devices.router,
    audit.router,
    rollouts.router,
    trust.router,
    pieces.router,
)

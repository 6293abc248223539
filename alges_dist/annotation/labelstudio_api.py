"""A small Label Studio REST client (stdlib only): projects, local-files storage, import, export.

Authentication is ``Authorization: Token <token>`` (Label Studio's legacy API token).
The token lives only in this object's memory: it is read from the environment variable
the config names (:func:`client_from_env`), never stored in the config, never logged,
never part of an error message or ``repr``.
"""

from __future__ import annotations

import json
import logging
import os
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from alges_dist.errors import AlgesError, InputError

log = logging.getLogger(__name__)


class LabelStudioError(AlgesError, RuntimeError):
    """A request Label Studio refused or could not answer; names the method, path and status."""


class LabelStudioClient:
    """Calls the REST API of one Label Studio server."""

    def __init__(self, url: str, token: str, *, timeout_seconds: float = 60.0):
        if not token:
            raise InputError("the Label Studio token is empty")
        self.url = url.rstrip("/")
        self._token = token
        self.timeout_seconds = timeout_seconds

    def __repr__(self) -> str:  # never show the token
        return f"LabelStudioClient({self.url!r})"

    def request(self, method: str, path: str, body: Any = None, *, query: dict[str, Any] | None = None) -> Any:
        """JSON in, JSON out; raises LabelStudioError with the status and the server's message."""
        url = f"{self.url}{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
        data = None if body is None else json.dumps(body).encode("utf-8")
        req = urllib.request.Request(url, data=data, method=method, headers={
            "Authorization": f"Token {self._token}", "Content-Type": "application/json", "Accept": "application/json"})
        log.debug("label studio %s %s", method, path)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_seconds) as response:
                payload = response.read()
        except urllib.error.HTTPError as err:
            detail = err.read()[:500].decode("utf-8", "replace")
            raise LabelStudioError(f"Label Studio {method} {path}: HTTP {err.code}: {detail}") from None
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise LabelStudioError(f"Label Studio at {self.url} did not answer {method} {path}: {reason}") from None
        return json.loads(payload) if payload else None

    # ---- the calls alges makes --------------------------------------------------------
    def project_id(self, title: str, label_config: str) -> int:
        """The project called ``title``, created with ``label_config`` when there is none."""
        page, found = 1, []
        while True:
            listing = self.request("GET", "/api/projects", query={"title": title, "page": page, "page_size": 100})
            results = listing.get("results", listing) if isinstance(listing, dict) else listing
            found += [p for p in results if p.get("title") == title]
            if not isinstance(listing, dict) or not listing.get("next"):
                break
            page += 1
        if len(found) > 1:
            raise LabelStudioError(f"{len(found)} Label Studio projects are called {title!r} (ids "
                                   f"{[p['id'] for p in found]}); rename all but one or set labelstudio.project")
        if found:
            return int(found[0]["id"])
        created = self.request("POST", "/api/projects", {"title": title, "label_config": label_config})
        log.info("created Label Studio project %r (id %s)", title, created["id"])
        return int(created["id"])

    def label_config(self, project_id: int) -> str:
        return self.request("GET", f"/api/projects/{project_id}")["label_config"]

    def ensure_local_storage(self, project_id: int, path: str, title: str) -> None:
        """A local-files source storage for ``path`` (the server serves ``/data/local-files/`` from it)."""
        storages = self.request("GET", "/api/storages/localfiles", query={"project": project_id})
        if any(s.get("path") == path for s in storages):
            return
        self.request("POST", "/api/storages/localfiles",
                     {"project": project_id, "path": path, "title": title[:200], "use_blob_urls": True})

    def import_tasks(self, project_id: int, tasks: list[dict[str, Any]]) -> dict[str, Any]:
        return self.request("POST", f"/api/projects/{project_id}/import", tasks)

    def export_tasks(self, project_id: int) -> list[dict[str, Any]]:
        """Every task of the project in Label Studio's JSON export format (annotations included)."""
        return self.request("GET", f"/api/projects/{project_id}/export",
                            query={"exportType": "JSON", "download_all_tasks": "true"})


def client_from_env(url: str, token_env: str, environ: dict[str, str] | None = None) -> LabelStudioClient:
    """A client whose token is the value of the environment variable ``token_env``.

    Raises ValueError naming the variable (never a value) when it is unset or empty.
    """
    environ = os.environ if environ is None else environ
    token = environ.get(token_env, "")
    if not token:
        raise InputError(f"environment variable {token_env} (labelstudio.token_env) is not set: export the "
                         "Label Studio API token there (Account & Settings > Access Token)")
    return LabelStudioClient(url, token)

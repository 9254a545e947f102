"""Push OCI layouts made by ``tools/ocilayout.py`` to a registry (test code).

Blobs go up with the distribution API's monolithic upload (POST an upload, PUT it with
``?digest=``), then child manifests by digest, then the top manifest or index by tag.
``docker=True`` rewrites the manifests to Docker schema 2 (same blobs, Docker media types)
so that both formats are served by a real registry.
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

import httpx
from ocilayout import read_layout

from microagent.images.credentials import parse_www_authenticate

DOCKER_TYPES = {
    "application/vnd.oci.image.manifest.v1+json":
        "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.oci.image.index.v1+json":
        "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.config.v1+json":
        "application/vnd.docker.container.image.v1+json",
    "application/vnd.oci.image.layer.v1.tar+gzip":
        "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.oci.image.layer.v1.tar": "application/vnd.docker.image.rootfs.diff.tar",
}


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Pusher:
    """An httpx client for one repository that answers basic and bearer challenges."""

    def __init__(self, host: str, repository: str, *, credentials: tuple[str, str] | None,
                 plain_http: bool) -> None:
        self.repository = repository
        self.credentials = credentials
        self.client = httpx.Client(base_url=f"{'http' if plain_http else 'https'}://{host}",
                                   timeout=30.0)
        self.authorization: str | None = None

    def close(self) -> None:
        self.client.close()

    def request(self, method: str, url: str | httpx.URL, **kwargs: Any) -> httpx.Response:
        """Send, and on a 401 authenticate and send once more."""
        response = self._send(method, url, **kwargs)
        if response.status_code == 401:
            self.authorization = self._authorize(response)
            response = self._send(method, url, **kwargs)
        if response.is_error:
            raise RuntimeError(f"{method} {url}: {response.status_code} {response.text}")
        return response

    def push_blob(self, digest: str, data: bytes) -> None:
        path = f"/v2/{self.repository}/blobs/{digest}"
        if self._send("HEAD", path).status_code == 200:
            return
        started = self.request("POST", f"/v2/{self.repository}/blobs/uploads/")
        location = self.client.base_url.join(started.headers["Location"])
        self.request("PUT", location.copy_merge_params({"digest": digest}), content=data,
                     headers={"Content-Type": "application/octet-stream"})

    def push_manifest(self, reference: str, data: bytes, media_type: str) -> str:
        self.request("PUT", f"/v2/{self.repository}/manifests/{reference}", content=data,
                     headers={"Content-Type": media_type})
        return sha256(data)

    def _send(self, method: str, url: str | httpx.URL, **kwargs: Any) -> httpx.Response:
        headers = dict(kwargs.pop("headers", {}))
        if self.authorization:
            headers["Authorization"] = self.authorization
        return self.client.request(method, url, headers=headers, **kwargs)

    def _authorize(self, response: httpx.Response) -> str:
        basic = None
        if self.credentials:
            basic = "Basic " + base64.b64encode(":".join(self.credentials).encode()).decode()
        challenge = parse_www_authenticate(response.headers.get_list("WWW-Authenticate"))[0]
        if challenge.scheme == "basic":
            if basic is None:
                raise RuntimeError("the registry wants basic auth and we have no credentials")
            return basic
        params = {"service": challenge.params.get("service", ""),
                  "scope": f"repository:{self.repository}:pull,push"}
        token = httpx.get(challenge.params["realm"], params=params,
                          headers={"Authorization": basic} if basic else {})
        token.raise_for_status()
        return f"Bearer {token.json()['token']}"


def push_layout(host: str, repository: str, tag: str, layout: Path, *,
                credentials: tuple[str, str] | None = None, plain_http: bool = True,
                docker: bool = False) -> str:
    """Push an image of ``layout`` as ``repository:tag``; the pushed top digest.

    The image is the layout's one tagged ``tag``, or its only one whatever its tag. With
    ``docker=True`` the manifests are pushed as Docker schema 2 (manifest list for an
    index); the digest returned is then the converted top manifest's.
    """
    names = [m.get("annotations", {}).get("org.opencontainers.image.ref.name")
             for m in json.loads((layout / "index.json").read_text())["manifests"]]
    top, files = read_layout(layout, tag if tag in names or len(names) != 1 else names[0])
    blobs = {f"sha256:{path.name}": data for path, data in files.items()}
    pusher = Pusher(host, repository, credentials=credentials, plain_http=plain_http)
    try:
        return str(_push_tree(pusher, blobs, top["digest"], docker, tag)["digest"])
    finally:
        pusher.close()


def _push_tree(pusher: Pusher, blobs: dict[str, bytes], digest: str, docker: bool,
               tag: str | None = None) -> dict[str, Any]:
    """Push one manifest (after what it refers to); its new descriptor."""
    document = json.loads(blobs[digest])
    if "manifests" in document:
        document["manifests"] = [{**child, **_push_tree(pusher, blobs, child["digest"], docker)}
                                 for child in document["manifests"]]
    else:
        for descriptor in [document["config"], *document["layers"]]:
            pusher.push_blob(descriptor["digest"], blobs[descriptor["digest"]])
            if docker:
                descriptor["mediaType"] = DOCKER_TYPES[descriptor["mediaType"]]
    media_type = document["mediaType"]
    data = blobs[digest]
    if docker:
        media_type = document["mediaType"] = DOCKER_TYPES[media_type]
        data = json.dumps(document, sort_keys=True).encode()
    new_digest = pusher.push_manifest(tag or sha256(data), data, media_type)
    return {"mediaType": media_type, "digest": new_digest, "size": len(data)}

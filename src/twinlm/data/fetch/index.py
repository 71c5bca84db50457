"""pip's package index as `pip download` would use it: where it is, how to ask it, and a project's files.

The index is `PIP_INDEX_URL`, else `index-url` from pip's configuration (read by `python -m pip config list`:
pip's own reading of its files and `PIP_*` variables, in `pip download`'s order `global.` < `download.` <
`:env:`; no package code runs), else PyPI's simple index. The certificate bundle follows the same order
(`PIP_CERT`, else `cert`), falling back to the system's.

Credentials in the index URL (`https://user:pass@host/simple`, percent-escaped as pip takes them) are taken
out of it and sent as an HTTP basic `Authorization` header, to the index's host only: a file on another host
(or a redirect there) gets no credentials, and no message shows them.

A project's page is asked for as PEP 691 JSON and read as PEP 503 HTML when the index answers with HTML
(older Nexus, Artifactory, devpi, a `file://` tree): each anchor's text is a file name, its `href` (resolved
against the page, or its `<base href>`) the file, and a `#sha256=` fragment the file's hash.
"""

from __future__ import annotations

import ast
import base64
import json
import os
import re
import ssl
import subprocess
import sys
import urllib.parse
import urllib.request
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import IO

from twinlm.errors import FetchError

PYPI_SIMPLE = "https://pypi.org/simple/"
# pip's own Accept header: JSON first, HTML when that is all the index serves
ACCEPT_PAGE = "application/vnd.pypi.simple.v1+json, application/vnd.pypi.simple.v1+html; q=0.1, text/html; q=0.01"
JSON_TYPES = ("application/vnd.pypi.simple.v1+json", "application/json")


@dataclass(frozen=True)
class IndexFile:
    """One file a project's page lists: its name, absolute URL (without fragment) and sha256 when given."""

    filename: str
    url: str
    sha256: str | None


@dataclass(frozen=True)
class Index:
    """An index URL without credentials (safe to show), the basic credentials it came with, and pip's CA bundle."""

    url: str
    auth: str | None = None  # the Authorization header's value
    cert: str | None = None

    @classmethod
    def from_url(cls, url: str, cert: str | None = None) -> Index:
        """`url` with any `user:pass@` taken out into an HTTP basic Authorization value."""
        url, auth = strip_credentials(url)
        return cls(url.rstrip("/") + "/", auth, cert)


def strip_credentials(url: str) -> tuple[str, str | None]:
    """(the URL without its userinfo, a `Basic …` Authorization value or None); a user without password sends
    an empty one, as pip does for a token."""
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return url, None
    userinfo, host = parts.netloc.rsplit("@", 1)
    user, _, password = userinfo.partition(":")
    pair = f"{urllib.parse.unquote(user)}:{urllib.parse.unquote(password)}"
    return (urllib.parse.urlunsplit(parts._replace(netloc=host)),
            "Basic " + base64.b64encode(pair.encode()).decode())


def pip_config() -> dict[str, str]:
    """pip's settings for `pip download` (`index-url`, `cert`, …) from `python -m pip config list`."""
    result = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True)
    if result.returncode != 0:
        raise FetchError(f"`{sys.executable} -m pip config list` failed (a broken pip configuration?): "
                         f"{result.stderr.strip()[-500:]}")
    ranked: dict[str, tuple[int, str]] = {}
    order = {"global": 0, "download": 1, ":env:": 2}
    for line in result.stdout.splitlines():
        key, eq, value = line.partition("=")
        section, dot, name = key.partition(".")
        if not (eq and dot) or section not in order:
            continue
        try:
            text = ast.literal_eval(value)  # pip prints each value as a Python literal
        except (ValueError, SyntaxError):
            text = value
        name = name.lower().replace("_", "-")
        if name not in ranked or ranked[name][0] <= order[section]:
            ranked[name] = (order[section], str(text))
    return {name: value for name, (_, value) in ranked.items()}


def pip_index(config: dict[str, str] | None = None) -> Index:
    """The index pip reads: `PIP_INDEX_URL`, else pip's configured `index-url`, else PyPI (`config`, when
    given, stands for `pip_config()`, which is run only when an environment variable does not decide)."""
    url, cert = os.environ.get("PIP_INDEX_URL"), os.environ.get("PIP_CERT")
    if not url or not cert:
        config = pip_config() if config is None else config
        url, cert = url or config.get("index-url"), cert or config.get("cert")
    return Index.from_url((url or PYPI_SIMPLE).strip(), cert or None)


class _SameHostAuth(urllib.request.HTTPRedirectHandler):
    """Follows redirects, carrying the Authorization header only to the same host."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and urllib.parse.urlsplit(newurl).netloc != urllib.parse.urlsplit(req.full_url).netloc:
            new.remove_header("Authorization")
        return new


def open_url(index: Index, url: str, accept: str = "*/*") -> IO[bytes]:
    """`url` opened for reading, with the index's credentials when it is on the index's host."""
    url, own_auth = strip_credentials(urllib.parse.urldefrag(url)[0])
    if url.startswith("file:"):
        path = Path(urllib.request.url2pathname(urllib.parse.urlsplit(url).path))
        return open(path / "index.html" if path.is_dir() else path, "rb")  # a file:// simple tree, as pip reads it
    request = urllib.request.Request(url, headers={"Accept": accept, "User-Agent": "twinlm-fetch"})
    same_host = urllib.parse.urlsplit(url).netloc == urllib.parse.urlsplit(index.url).netloc
    auth = own_auth or (index.auth if same_host else None)
    if auth:
        request.add_header("Authorization", auth)
    cert = index.cert
    context = ssl.create_default_context(cafile=cert if cert and os.path.isfile(cert) else None,
                                         capath=cert if cert and os.path.isdir(cert) else None)
    opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=context), _SameHostAuth)
    return opener.open(request, timeout=180)


class _Anchors(HTMLParser):
    """The `<a href>` anchors of a PEP 503 page, with their text, and its `<base href>`."""

    def __init__(self) -> None:
        super().__init__()
        self.base: str | None = None
        self.anchors: list[tuple[str, str]] = []
        self._href: str | None = None
        self._text: list[str] = []

    def handle_starttag(self, tag, attrs):
        href = dict(attrs).get("href")
        if tag == "base" and href and self.base is None:
            self.base = href
        elif tag == "a" and href is not None:
            self._href, self._text = href, []

    def handle_data(self, data):
        if self._href is not None:
            self._text.append(data)

    def handle_endtag(self, tag):
        if tag == "a" and self._href is not None:
            self.anchors.append((self._href, "".join(self._text).strip()))
            self._href = None


def parse_page(page_url: str, body: bytes, content_type: str) -> list[IndexFile]:
    """The files a project page lists: PEP 691 JSON when its content type says so, else PEP 503 HTML."""
    if content_type.split(";")[0].strip().lower() in JSON_TYPES:
        listing = json.loads(body)
        return [IndexFile(f["filename"], urllib.parse.urljoin(page_url, f["url"]),
                          (f.get("hashes") or {}).get("sha256"))
                for f in listing.get("files", []) if "filename" in f and "url" in f]
    parser = _Anchors()
    parser.feed(body.decode("utf-8", errors="replace"))
    base = urllib.parse.urljoin(page_url, parser.base) if parser.base else page_url
    files = []
    for href, text in parser.anchors:
        url, fragment = urllib.parse.urldefrag(urllib.parse.urljoin(base, href))
        name = text or urllib.parse.unquote(url.rsplit("/", 1)[-1])
        digest = re.fullmatch(r"sha256=([0-9a-fA-F]{64})", fragment)
        files.append(IndexFile(name, url, digest.group(1).lower() if digest else None))
    return files


def project_page(index: Index, project: str) -> str:
    """The URL of a project's page on the index, its name normalised as PEP 503 says."""
    return urllib.parse.urljoin(index.url, re.sub(r"[-_.]+", "-", project).lower() + "/")


def project_files(index: Index, page: str) -> list[IndexFile]:
    """The files a project's page (`project_page`) lists."""
    with open_url(index, page, ACCEPT_PAGE) as r:
        body = r.read()
        content_type = r.headers.get("Content-Type", "") if hasattr(r, "headers") else "text/html"
    try:
        return parse_page(page, body, content_type)
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # a JSON page that is not a PEP 691 listing
        raise FetchError(f"{page} is not a PEP 691 project page: {e}") from e

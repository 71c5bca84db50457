"""Pinned sdists from pip's index (data/fetch/index.py, download.py `download_sdist`), without network: a local
HTTP server in a thread serves a project's simple page (PEP 691 JSON or PEP 503 HTML, with or without basic
auth) and the file; pip's configuration is read from a temporary pip.conf through PIP_CONFIG_FILE."""

import base64
import hashlib
import http.server
import json
import os
import subprocess
import sys
import tarfile
import threading

import pytest

from twinlm.data import fetch as F
from twinlm.data.fetch import download
from twinlm.data.fetch.index import PYPI_SIMPLE, Index, parse_page, pip_index

SHA_A = "a" * 64


class IndexServer:
    """A simple index at http://127.0.0.1:PORT/simple/ serving `files` (name -> bytes) for project `demo`:
    `mode` json or html, `hashes` whether the page gives each file's sha256, `auth` a required `user:pass`,
    `file_host` another IndexServer the page's links point to (or, with `redirect`, its own /files/ redirect to).
    Every request is logged as (path, headers)."""

    def __init__(self, files: dict, mode: str = "json", hashes: bool = True, auth: str | None = None):
        self.files, self.mode, self.hashes, self.auth, self.file_host = files, mode, hashes, auth, None
        self.redirect = False
        self.requests: list[tuple[str, dict]] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests.append((self.path, dict(self.headers)))
                if server.auth and self.headers.get("Authorization") != \
                        "Basic " + base64.b64encode(server.auth.encode()).decode():
                    return self.send_error(401)
                if server.redirect and self.path.startswith("/files/"):  # to file_host, as a CDN would be
                    self.send_response(302)
                    self.send_header("Location", server.file_host.url + self.path)
                    return self.end_headers()
                body, kind = server.answer(self.path)
                if body is None:
                    return self.send_error(404)
                self.send_response(200)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def answer(self, path: str):
        if path == "/simple/demo/":
            host = self.file_host.url if self.file_host and not self.redirect else ""
            links = [(f"{host}/files/{n}" if host else f"../../files/{n}", n, hashlib.sha256(b).hexdigest())
                     for n, b in self.files.items()]
            if self.mode == "json":
                listing = {"meta": {"api-version": "1.0"}, "name": "demo",
                           "files": [{"filename": n, "url": u, "hashes": {"sha256": h} if self.hashes else {}}
                                     for u, n, h in links]}
                return json.dumps(listing).encode(), "application/vnd.pypi.simple.v1+json"
            anchors = "".join(f'<a href="{u}{"#sha256=" + h if self.hashes else ""}" data-requires-python="&gt;=3">'
                              f"{n}</a><br/>\n" for u, n, h in links)
            return f"<!DOCTYPE html><html><body><h1>demo</h1>\n{anchors}</body></html>".encode(), "text/html"
        name = path.removeprefix("/files/")
        return (self.files.get(name), "application/octet-stream") if path.startswith("/files/") else (None, "")

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def sdist(tmp_path):
    """demo-1.0.tar.gz whose setup.py would write tmp_path/RAN if any package code ran; (bytes, sha256)."""
    setup = tmp_path / "setup.py"
    setup.write_text(f"open({str(tmp_path / 'RAN')!r}, 'w').write('ran')\n")
    path = tmp_path / "demo-1.0.tar.gz"
    with tarfile.open(path, "w:gz") as t:
        t.add(setup, arcname="demo-1.0/setup.py")
    data = path.read_bytes()
    path.unlink()
    return data, hashlib.sha256(data).hexdigest()


@pytest.fixture
def servers():
    made: list[IndexServer] = []
    yield lambda *a, **k: made.append(IndexServer(*a, **k)) or made[-1]
    for s in made:
        s.close()


@pytest.fixture
def pip_conf(tmp_path, monkeypatch):
    """Write pip's configuration file (PIP_CONFIG_FILE) with `text`; pip's index and cert variables unset."""
    for name in ("PIP_INDEX_URL", "PIP_CERT"):
        monkeypatch.delenv(name, raising=False)

    def write(text: str):
        conf = tmp_path / "pip.conf"
        conf.write_text(text)
        monkeypatch.setenv("PIP_CONFIG_FILE", str(conf))
    return write


def only_pip_config(monkeypatch):
    """subprocess.run in download/index refuses anything but `python -m pip config list` (no package code)."""
    real = subprocess.run

    def run(cmd, *a, **k):
        assert cmd == [sys.executable, "-m", "pip", "config", "list"], f"no client may run for an sdist: {cmd}"
        return real(cmd, *a, **k)
    monkeypatch.setattr(download.subprocess, "run", run)


@pytest.mark.parametrize("mode", ["json", "html"])
def test_SEC14_a_pinned_sdist_is_downloaded_as_bytes_and_hashed_before_use(mode, sdist, servers, pip_conf,
                                                                           tmp_path, monkeypatch):
    data, pinned = sdist
    server = servers({"demo-1.0.tar.gz": data, "demo-0.9.tar.gz": b"older"}, mode=mode)
    pip_conf(f"[global]\nindex-url = {server.url}/simple\n")  # a mirror in pip.conf, as `pip download` reads it
    only_pip_config(monkeypatch)
    archive = F.Archive("pip", "Demo==1.0", "demo-1.0.tar.gz", pinned, version="1.0")
    home = tmp_path / "home"
    path, digest, is_pinned = F.ensure_archive(archive, home, log=lambda m: None)
    assert (digest, is_pinned, path.read_bytes()) == (pinned, True, data)
    [(page, page_headers), (file, _)] = server.requests
    assert (page, file) == ("/simple/demo/", "/files/demo-1.0.tar.gz")  # the name normalised, the href resolved
    assert page_headers["Accept"].startswith("application/vnd.pypi.simple.v1+json")
    assert not (tmp_path / "RAN").exists()
    # a file replaced on the index: refused by the hash its page gives (nothing downloaded), else by its own
    path.unlink()
    server.files["demo-1.0.tar.gz"] = data + b"tampered"
    with pytest.raises(F.FetchError, match=r"lists demo-1.0.tar.gz with sha256 [0-9a-f]{64}, not the pinned"):
        F.ensure_archive(archive, home, log=lambda m: None)
    assert server.requests[-1][0] == "/simple/demo/"
    server.hashes = False
    with pytest.raises(F.FetchError, match="sha256 mismatch for demo-1.0.tar.gz"):
        F.ensure_archive(archive, home, log=lambda m: None)
    assert server.requests[-1][0] == "/files/demo-1.0.tar.gz"
    assert [p.name for p in (home / "downloads").iterdir()] == []
    with pytest.raises(F.FetchError, match=r"demo-2.0.tar.gz is not listed on http://127.*/simple/demo/ \(2 files"):
        F.ensure_archive(F.Archive("pip", "demo==2.0", "demo-2.0.tar.gz", pinned, version="2.0"), home,
                         log=lambda m: None)


def test_credentials_in_the_index_url_go_as_basic_auth_to_its_host_only(sdist, servers, pip_conf, tmp_path):
    data, pinned = sdist
    files = servers({"demo-1.0.tar.gz": data})  # another host (port) serving the files: no credentials sent there
    index = servers({"demo-1.0.tar.gz": data}, mode="html", auth="me:p@ss word")
    index.file_host = files
    archive = F.Archive("pip", "demo==1.0", "demo-1.0.tar.gz", pinned, version="1.0")
    host = index.url.removeprefix("http://")
    pip_conf(f"[global]\nindex-url = http://me:p%40ss%20word@{host}/simple/\n")
    got = download.download_sdist(archive, tmp_path)
    assert got.read_bytes() == data
    [(_, page_headers)] = index.requests
    [(_, file_headers)] = files.requests
    assert page_headers["Authorization"] == "Basic " + base64.b64encode(b"me:p@ss word").decode()
    assert "Authorization" not in file_headers
    # the index's own file link redirecting to another host: the credentials stay behind
    index.redirect = True
    got.unlink()
    assert download.download_sdist(archive, tmp_path).read_bytes() == data
    assert [(path, "Authorization" in h) for path, h in index.requests[1:]] == [
        ("/simple/demo/", True), ("/files/demo-1.0.tar.gz", True)]
    assert files.requests[-1][0] == "/files/demo-1.0.tar.gz" and "Authorization" not in files.requests[-1][1]
    # a wrong password: the server's 401 in one line, the password never shown
    with pytest.raises(F.FetchError, match=rf"from http://{host}/simple/demo/ failed: HTTP Error 401") as e:
        download.download_sdist(archive, tmp_path, Index.from_url(f"http://me:s3cret@{host}/simple"))
    assert "s3cret" not in str(e.value) and "\n" not in str(e.value)


def test_the_index_is_pip_index_url_else_pip_config_else_pypi(pip_conf, tmp_path, monkeypatch):
    bundle = tmp_path / "ca.pem"
    bundle.write_text("")
    # pip download reads [download] over [global]; PIP_CONFIG_FILE is loaded last, over the machine's files
    pip_conf(f"[global]\nindex-url = https://global.example/simple\ncert = {bundle}\n"
             "[download]\nindex-url = https://tok%3Aen@mirror.example/pypi/simple\n")
    assert pip_index() == Index("https://mirror.example/pypi/simple/",
                                "Basic " + base64.b64encode(b"tok:en:").decode(), str(bundle))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # pip reads no configuration file
    assert pip_index().url == PYPI_SIMPLE == "https://pypi.org/simple/"
    # the environment decides without running pip
    monkeypatch.setenv("PIP_INDEX_URL", "https://env.example/simple")
    monkeypatch.setenv("PIP_CERT", str(bundle))
    monkeypatch.setattr(download.subprocess, "run", lambda *a, **k: pytest.fail("pip config ran"))
    assert pip_index() == Index("https://env.example/simple/", None, str(bundle))


def test_a_pep503_page_gives_names_resolved_links_and_fragment_hashes():
    page = "https://mirror.example/repository/pypi/simple/demo/"
    html = (b'<html><body><a href="../../packages/demo-1.0.tar.gz#sha256=' + SHA_A.upper().encode()
            + b'" data-requires-python="&gt;=3.8">demo-1.0.tar.gz</a>\n'
            b'<a href="https://files.example/demo-0.9.zip#md5=abc">demo-0.9.zip</a>\n'
            b'<a href="/p/demo-0.8.tar.gz"></a></body></html>')
    assert [(f.filename, f.url, f.sha256) for f in parse_page(page, html, "text/html; charset=utf-8")] == [
        ("demo-1.0.tar.gz", "https://mirror.example/repository/pypi/packages/demo-1.0.tar.gz", SHA_A),
        ("demo-0.9.zip", "https://files.example/demo-0.9.zip", None),
        ("demo-0.8.tar.gz", "https://mirror.example/p/demo-0.8.tar.gz", None)]
    based = b'<html><head><base href="https://cdn.example/x/"></head><a href="demo-1.0.tar.gz">demo-1.0.tar.gz</a>'
    assert parse_page(page, based, "text/html")[0].url == "https://cdn.example/x/demo-1.0.tar.gz"


def test_a_file_tree_index_is_read_as_pip_reads_it(sdist, tmp_path):
    """A `file://` simple tree (each project folder's index.html), as pip reads one."""
    data, pinned = sdist
    (tmp_path / "simple" / "demo").mkdir(parents=True)
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "demo-1.0.tar.gz").write_bytes(data)
    (tmp_path / "simple" / "demo" / "index.html").write_text(
        f'<a href="../../files/demo-1.0.tar.gz#sha256={pinned}">demo-1.0.tar.gz</a>')
    archive = F.Archive("pip", "demo==1.0", "demo-1.0.tar.gz", pinned, version="1.0")
    (tmp_path / "out").mkdir()
    got = download.download_sdist(archive, tmp_path / "out", Index.from_url((tmp_path / "simple").as_uri()))
    assert got.read_bytes() == data

"""Downloading annotator weights: a local HTTP server on 127.0.0.1 serves good, truncated and
wrong files; nothing may be left behind on failure and errors must say what to do."""
import hashlib
import http.server
import os
import socket
import threading

import pytest

from xctrl.preprocessors import annotator_files as af

PAYLOAD = bytes(range(256)) * 64  # 16 KiB


class Handler(http.server.BaseHTTPRequestHandler):
    requests = []

    def log_message(self, *args):
        pass

    def do_GET(self):
        Handler.requests.append(self.path)
        if self.path == "/good.bin":
            self._send(200, PAYLOAD)
        elif self.path == "/truncated.bin":  # announces the full size, sends half, closes
            self.send_response(200)
            self.send_header("Content-Length", str(len(PAYLOAD)))
            self.end_headers()
            self.wfile.write(PAYLOAD[: len(PAYLOAD) // 2])
            self.wfile.flush()
            self.close_connection = True
        elif self.path == "/page.html":
            self._send(200, b"<!DOCTYPE html><html><body>Sign in</body></html>" + b" " * 100)
        else:
            self._send(404, b"not found")

    def _send(self, code, body):
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def entry(**kw):
    base = dict(name="weights.pth", url="https://example.invalid/weights.pth", size=len(PAYLOAD),
                sha256=hashlib.sha256(PAYLOAD).hexdigest(), approx="16 KB")
    base.update(kw)
    return af.AnnotatorFile(**base)


def leftovers(folder):
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def test_download_checks_and_renames(server, tmp_path):
    folder = tmp_path / "annotators"  # created on demand
    seen = []
    path = af.download(entry(), str(folder), progress=lambda done, total: seen.append((done, total)), url=server + "/good.bin")
    assert path == str(folder / "weights.pth")
    with open(path, "rb") as f:
        assert f.read() == PAYLOAD
    assert leftovers(folder) == ["weights.pth"]
    assert seen[0] == (0, len(PAYLOAD)) and seen[-1] == (len(PAYLOAD), len(PAYLOAD))


def test_present_file_is_never_downloaded_again(server, tmp_path):
    (tmp_path / "weights.pth").write_bytes(b"mine")
    Handler.requests.clear()
    assert af.download(entry(), str(tmp_path), url=server + "/good.bin") == str(tmp_path / "weights.pth")
    assert Handler.requests == []
    assert (tmp_path / "weights.pth").read_bytes() == b"mine"


def test_truncated_download_leaves_nothing(server, tmp_path):
    with pytest.raises(af.AnnotatorDownloadError) as e:
        af.download(entry(sha256=None), str(tmp_path), url=server + "/truncated.bin")
    msg = str(e.value)
    assert "weights.pth" in msg and str(tmp_path) in msg and "https://example.invalid/weights.pth" in msg
    assert "interrupted" in msg or "truncated" in msg
    assert leftovers(tmp_path) == []


def test_checksum_mismatch_leaves_nothing(server, tmp_path):
    with pytest.raises(af.AnnotatorDownloadError, match="SHA-256") as e:
        af.download(entry(sha256="0" * 64), str(tmp_path), url=server + "/good.bin")
    assert "put it in " + str(tmp_path) in str(e.value)
    assert leftovers(tmp_path) == []


def test_size_mismatch_and_html_page_are_refused(server, tmp_path):
    with pytest.raises(af.AnnotatorDownloadError, match="expected 99"):
        af.download(entry(size=99, sha256=None), str(tmp_path), url=server + "/good.bin")
    with pytest.raises(af.AnnotatorDownloadError, match="web page"):
        af.download(entry(size=None, sha256=None), str(tmp_path), url=server + "/page.html")
    with pytest.raises(af.AnnotatorDownloadError, match="only"):
        af.download(entry(size=None, sha256=None, min_size=10 ** 6, approx="1 MB"), str(tmp_path), url=server + "/good.bin")
    assert leftovers(tmp_path) == []


def test_http_error(server, tmp_path):
    with pytest.raises(af.AnnotatorDownloadError, match="HTTP 404"):
        af.download(entry(), str(tmp_path), url=server + "/missing.bin")
    assert leftovers(tmp_path) == []


def test_offline_connection_refused_message(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(af.AnnotatorDownloadError) as e:
        af.download(entry(), str(tmp_path), url=f"http://127.0.0.1:{port}/weights.pth", timeout=5)
    msg = str(e.value)
    assert "weights.pth is missing" in msg and "offline" in msg
    assert "Download weights.pth (16 KB) from https://example.invalid/weights.pth and put it in " + str(tmp_path) in msg
    assert leftovers(tmp_path) == []


def test_known_files_table():
    assert set(af.KNOWN_FILES) == {"ControlNetHED.pth", "body_pose_model.pth", "depth_anything_v2_vits.pth", "yolox_l.onnx", "dw-ll_ucoco_384.onnx"}
    repos = {"ControlNetHED.pth": "lllyasviel/Annotators", "body_pose_model.pth": "lllyasviel/Annotators",
             "depth_anything_v2_vits.pth": "depth-anything/Depth-Anything-V2-Small", "yolox_l.onnx": "yzd-v/DWPose",
             "dw-ll_ucoco_384.onnx": "yzd-v/DWPose"}
    for name, e in af.KNOWN_FILES.items():
        assert e.url == f"https://huggingface.co/{repos[name]}/resolve/main/{name}"
        assert e.size or e.min_size
        assert e.sha256 is None or (len(e.sha256) == 64 and int(e.sha256, 16) >= 0)
        assert e.approx and e.licence and e.used_by.startswith("XCtrl_")

"""The real ComfyUI server (main.py --cpu) with this pack installed, for end-to-end tests.

Everything the server writes (models, custom_nodes, input, output, user, database) goes
into a temporary base directory; the pack is linked into its custom_nodes. Bounded in
time and always stopped.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

from .comfy_runtime import PACK_DIR, PACK_FOLDER_NAME, check_root


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    def __init__(self, root, startup_timeout=240, env=None):
        self.root = check_root(root)
        self.extra_env = env or {}  # e.g. a role another pack reads at start-up
        self.base = tempfile.mkdtemp(prefix="xctrl_server_")
        os.makedirs(os.path.join(self.base, "custom_nodes"))
        os.symlink(PACK_DIR, os.path.join(self.base, "custom_nodes", PACK_FOLDER_NAME))
        self.models_dir = os.path.join(self.base, "models")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = os.path.join(self.base, "server.log")
        self.startup_timeout = startup_timeout
        self.proc = None

    def start(self):
        cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--disable-auto-launch", "--base-directory", self.base, "--database-url", "sqlite:///:memory:"]
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=self.root, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True, env=dict(os.environ, **self.extra_env))
        deadline = time.time() + self.startup_timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode} during start-up:\n{self.log()[-4000:]}")
            try:
                self.get("/object_info")
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(1)
        self.stop()
        raise TimeoutError(f"ComfyUI did not answer within {self.startup_timeout}s:\n{self.log()[-4000:]}")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        if getattr(self, "_log", None):
            self._log.close()

    def log(self):
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def get(self, path, timeout=30):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read())

    def post(self, path, payload, timeout=30):
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def run_prompt(self, prompt, timeout=300):
        """Queues an API-format prompt and waits for its history entry."""
        status, body = self.post("/prompt", {"prompt": prompt, "client_id": "xctrl-tests"}, timeout=timeout)
        if status != 200:
            return {"status": {"status_str": "invalid", "messages": [body]}, "outputs": {}}
        return self.wait_for_history(body["prompt_id"], timeout)

    def wait_for_history(self, pid, timeout):
        """The history entry of prompt ``pid`` once it succeeded or failed. Polls until the one
        bound ``timeout``: a request the busy server answers slowly (it may be loading or
        running on the same cores) is asked again, so no single read's time limit fails a run."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                hist = self.get(f"/history/{pid}", timeout=max(1.0, deadline - time.time()))
            except (TimeoutError, urllib.error.URLError, ConnectionError) as e:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log()[-4000:]}") from e
                time.sleep(0.5)
                continue
            status = hist.get(pid, {}).get("status", {})
            if status.get("completed") is not None and status.get("status_str") in ("success", "error"):
                return hist[pid]
            time.sleep(0.5)
        raise TimeoutError(f"prompt {pid} did not finish in {timeout}s")

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

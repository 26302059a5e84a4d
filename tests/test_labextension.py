"""JupyterLab's Dask panel with dask-spank (issue 25): a real Jupyter server
(jupyter_server, JupyterLab, dask-labextension and jupyter-server-proxy of
the sandbox's venv) runs as the test user on loopback, configured by the
user guide's own `~/.config/dask/labextension.yaml`. Through the panel's
REST API (dask-labextension's /dask/clusters) it creates a cluster, lists
it with its workers, scales it, adapts it, lists the clusters started with
`dask-spank up`, serves the dashboard's plots through the panel's path
(private: the token is added on the server's side), and shuts clusters
down (their Slurm jobs gone). Then headless Chromium, as the test user,
opens JupyterLab with the Dask panel: its DOM lists the clusters, the plot
buttons are live, a plot opens, and a screenshot is kept
(.sandbox/artifacts/labextension.png)."""
from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request

import pytest

import sandboxlib as sb
from test_keeper import ds

ARTIFACTS = sb.STATE / "artifacts"
RUNTIME = sb.HOME / ".local" / "share" / "jupyter" / "runtime"


def guide_config() -> str:
    """The labextension.yaml of the user guide (docs/user.md), verbatim."""
    doc = (sb.REPO / "docs" / "user.md").read_text()
    m = re.search(r"^```yaml\n(labextension:\n.*?)^```", doc, re.M | re.S)
    assert m, "docs/user.md shows a labextension.yaml"
    return m.group(1)


class Lab:
    """A Jupyter server of the test user's, and its REST API."""

    def __init__(self, proc: subprocess.Popen, info: dict, log):
        self.proc, self.log = proc, log
        self.pid, self.token = info["pid"], info["token"]
        self.base = f"http://127.0.0.1:{info['port']}"

    def request(self, method: str, path: str, body: dict | None = None, auth: bool = True,
                timeout: float = 120) -> tuple[int, bytes]:
        req = urllib.request.Request(self.base + path, method=method,
                                     data=None if body is None else json.dumps(body).encode())
        if auth:
            req.add_header("Authorization", f"token {self.token}")
        opener = urllib.request.build_opener(NoRedirect)
        try:
            with opener.open(req, timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def api(self, method: str, path: str, body: dict | None = None, expect: int = 200):
        status, data = self.request(method, path, body)
        assert status == expect, (method, path, status, data[:500])
        return json.loads(data) if data else None

    def clusters(self) -> dict[str, dict]:
        """The panel's list, by cluster name."""
        return {c["name"]: c for c in self.api("GET", "/dask/clusters")}

    def wait_listed(self, name: str, what: str, pred, timeout: float = 120) -> dict:
        return sb.wait_until(f"the panel to list {name} {what}",
                             lambda: (lambda c: c if c and pred(c) else None)(self.clusters().get(name)),
                             timeout, 1)


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def start_lab(env: dict | None = None, log_name: str = "jupyter-server.log") -> Lab:
    """`jupyter server` as the test user on 127.0.0.1 (a free port), found by
    the runtime file it writes (port, token, pid)."""
    sb.as_user(["mkdir", "-p", str(RUNTIME)])
    for f in RUNTIME.glob("jpserver-*"):
        f.unlink()
    log = open(sb.LOGS / log_name, "w")
    # Discovery every second, not every 10: it then runs while a panel's
    # close is under way, as it sometimes does at the default.
    env = {"DASK_DASK_SPANK__JUPYTER__DISCOVERY_INTERVAL": "1", **(env or {})}
    cmd = sb.user_command([str(sb.VENV / "bin" / "jupyter"), "server", "--ServerApp.ip=127.0.0.1",
                           "--ServerApp.port=0", "--ServerApp.open_browser=False",
                           f"--ServerApp.root_dir={sb.WORK}"], env=env)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def started():
        assert proc.poll() is None, (sb.LOGS / log_name).read_text()[-3000:]
        for f in RUNTIME.glob("jpserver-*.json"):
            try:
                return json.loads(f.read_text())
            except ValueError:
                return None
        return None

    return Lab(proc, sb.wait_until("the Jupyter server", started, 90, 0.3), log)


def stop_lab(lab: Lab) -> None:
    """Stop the server this test started (SIGTERM, then SIGKILL), by its pid
    and its session's."""
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        for kill in (lambda: os.kill(lab.pid, sig), lambda: os.killpg(lab.proc.pid, sig)):
            try:
                kill()
            except ProcessLookupError:
                pass
        try:
            lab.proc.wait(wait)
            break
        except subprocess.TimeoutExpired:
            continue
    lab.log.close()


@pytest.fixture(scope="module")
def lab():
    # The guide's configuration, in the user's dask configuration.
    conf = sb.HOME / ".config" / "dask"
    sb.as_user(["mkdir", "-p", str(conf)])
    sb.as_user(["/usr/bin/python3", "-c", "import sys; open(sys.argv[1], 'w').write(sys.argv[2])",
                str(conf / "labextension.yaml"), guide_config()])
    lab = start_lab()
    try:
        yield lab
    finally:
        stop_lab(lab)
        sb.as_user(["rm", "-f", str(conf / "labextension.yaml")])


def jobs_of(name: str) -> list[str]:
    out = sb.run(["squeue", "-h", "-r", "-n", f"dask-scheduler-{name},dask-worker-{name}", "-o", "%i"]).stdout
    return out.split()


def worker_jobs_of(name: str) -> list[str]:
    return sb.run(["squeue", "-h", "-r", "-n", f"dask-worker-{name}", "-o", "%i"]).stdout.split()


def test_the_dask_panel_creates_lists_scales_adapts_and_shuts_down_clusters(lab, cluster_name):
    # The guide's configuration: one 1G worker, names lab-N.
    created = lab.api("PUT", "/dask/clusters")
    name, cid = created["name"], created["id"]
    assert re.fullmatch(r"lab-\d+", name), created
    assert name in {c["cluster"] for c in json.loads(ds("ls", "--json").stdout)}
    assert any(j for j in jobs_of(name)), "its jobs are in Slurm's queue"
    try:
        model = lab.wait_listed(name, "with its worker", lambda c: c["workers"] == 1)
        assert model["id"] == cid and model["cores"] == 1 and model["memory"] == "1.00 GiB", model
        link = model["dashboard_link"]
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/status\?token=[0-9a-f]{48}", link), link

        # The panel's plots, through the Jupyter server: private all the same.
        plots = lab.api("GET", f"/dask/dashboard/{cid}/individual-plots.json")
        assert plots.get("Individual Task Stream") == "/individual-task-stream", plots
        status, page = lab.request("GET", f"/dask/dashboard/{cid}/individual-task-stream")
        assert status == 200 and b"bokeh" in page, (status, page[:300])
        status, page = lab.request("GET", f"/dask/dashboard/{cid}/individual-plots.json", auth=False)
        assert status in (302, 403) and b"Individual" not in page, (status, page[:300])
        direct = link.split("/status?")[0]
        for url in (f"{direct}/individual-plots.json", f"{direct}/dask-spank-token/{'0' * 48}/individual-plots.json"):
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(url, timeout=20)
            assert refused.value.code == 403, url

        # SCALE: two worker jobs.
        lab.api("PATCH", f"/dask/clusters/{cid}", {"workers": 2})
        lab.wait_listed(name, "with 2 workers", lambda c: c["workers"] == 2, 120)
        assert len(worker_jobs_of(name)) == 2, worker_jobs_of(name)

        # A cluster started elsewhere is listed too, under its name.
        ds("up", cluster_name, "--workers", "1", "--wait", "100", "--timeout", "180")
        other = lab.wait_listed(cluster_name, "(started with dask-spank up)", lambda c: c["workers"] == 1, 60)

        # The panel in a browser: both clusters, live plot buttons, a plot.
        seen = browse(lab, [name, cluster_name], select=cid, plot="Workers Memory")
        assert seen["plot"]["title"].startswith("Dask"), seen
        assert seen["plot"]["roots"] > 0, seen

        # SCALE, adaptive: the range goes to the scheduler job's keeper.
        adapted = lab.api("PATCH", f"/dask/clusters/{cid}", {"adapt": {"minimum": 0, "maximum": 1}})
        assert adapted["adapt"] == {"minimum": 0, "maximum": 1}, adapted
        sb.wait_until("the keeper to adapt", lambda: "adaptive 0..1" in ds("status", name).stdout, 30, 1)

        # SHUTDOWN, of a cluster started elsewhere too: every job cancelled.
        lab.api("DELETE", f"/dask/clusters/{other['id']}", expect=204)
        sb.wait_until(f"{cluster_name}'s jobs to end", lambda: not jobs_of(cluster_name), 60, 0.5)
    finally:
        status, said = lab.request("DELETE", f"/dask/clusters/{cid}")
    assert status == 204, said[-1000:]
    sb.wait_until(f"{name}'s jobs to end", lambda: not jobs_of(name), 60, 0.5)
    assert name not in lab.clusters() and cluster_name not in lab.clusters()
    assert name not in ds("ls").stdout


def test_a_cluster_that_ends_elsewhere_leaves_the_panel(lab, cluster_name):
    ds("up", cluster_name, "--workers", "0", "--timeout", "180")
    lab.wait_listed(cluster_name, "(started with dask-spank up)", lambda c: True, 90)
    ds("down", cluster_name)
    sb.wait_until("the panel to drop it", lambda: cluster_name not in lab.clusters(), 60, 1)


def test_a_start_the_site_refuses_is_one_clear_line_in_the_panel(lab):
    """+NEW with a worker memory over the site's limit: the panel gets the
    plugin's one-line refusal, and nothing is left in Slurm's queue."""
    before = set(sb.squeue_ids())
    bad = start_lab(env={"DASK_LABEXTENSION__FACTORY__KWARGS__WORKER_MEM": "900G"}, log_name="jupyter-server-bad.log")
    try:
        status, body = bad.request("PUT", "/dask/clusters")
    finally:
        stop_lab(bad)
    assert status == 500, (status, body[:500])
    message = json.loads(body)["message"]
    assert re.search(r"--mem=900G exceeds worker_mem_max=\w+", message), message
    assert len(message.strip().splitlines()) == 1, message
    assert set(sb.squeue_ids()) <= before


# Run by the test user with dask's dashboard link through jupyter-server-proxy.
PROXIED = """
import sys
from dask_spank import SpankCluster
print(SpankCluster(sys.argv[1]).dashboard_link)
"""


def test_the_token_survives_jupyter_server_proxy(lab, cluster_name):
    """With `distributed.dashboard.link` through jupyter-server-proxy, the
    link carries the token in its path: the dashboard answers through the
    proxy, and so do the paths joined to the link (the Dask panel's
    individual-plots.json and plots)."""
    ds("up", cluster_name, "--workers", "1", "--wait", "100", "--timeout", "180")
    r = sb.as_user([str(sb.VENV / "bin" / "python"), "-c", PROXIED, cluster_name], check=False, env={
        "DASK_DISTRIBUTED__DASHBOARD__LINK": "{JUPYTERHUB_SERVICE_PREFIX}proxy/{host}:{port}/status",
        "JUPYTERHUB_SERVICE_PREFIX": "/"})
    assert r.returncode == 0, r.stderr[-2000:]
    link = r.stdout.strip()
    m = re.fullmatch(r"/proxy/127\.0\.0\.1:(\d+)/dask-spank-token/([0-9a-f]{48})/status", link)
    assert m, link
    status, page = lab.request("GET", link)
    assert status == 200 and b"bokeh" in page, (status, page[:300])
    status, plots = lab.request("GET", link[: -len("status")] + "individual-plots.json")
    assert status == 200 and "Individual Task Stream" in json.loads(plots), (status, plots[:300])
    status, page = lab.request("GET", link.replace(m.group(2), "f" * 48))
    assert status == 403, (status, page[:300])
    ds("down", cluster_name)


# -- Chromium ---------------------------------------------------------------

# JupyterLab's layout with the Dask panel open in the left bar.
WORKSPACE = {"data": {"layout-restorer:data": {
    "main": {"dock": None},
    "left": {"collapsed": False, "visible": True, "current": "dask-dashboard-launcher",
             "widgets": ["filebrowser", "dask-dashboard-launcher"]},
    "right": {"collapsed": True, "visible": True, "widgets": []}}},
    "metadata": {"id": "dask"}}


class DevTools:
    """Chromium's DevTools protocol over its websocket (websocket-client)."""

    def __init__(self, url: str):
        import websocket

        self.ws = websocket.create_connection(url, suppress_origin=True, timeout=60)
        self.n = 0

    def call(self, method: str, **params):
        self.n += 1
        self.ws.send(json.dumps({"id": self.n, "method": method, "params": params}))
        while True:
            m = json.loads(self.ws.recv())
            if m.get("id") == self.n:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m["result"]

    def eval(self, expression: str):
        r = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return r["result"].get("value")


LISTED = "[...document.querySelectorAll('.dask-ClusterListingItem-title')].map(e => e.textContent)"
LIVE_PLOTS = ("[...document.querySelectorAll('.dask-DashboardListing-item button')]"
              ".filter(b => !b.disabled).map(b => b.value)")
PLOT = """(() => {
  const f = [...document.querySelectorAll('iframe')].find(f => f.src.includes('/dask/dashboard/'));
  if (!f) return null;
  const d = f.contentDocument;
  if (!d || !d.body) return {src: f.src, title: null, roots: 0};
  return {src: f.src, title: d.title, roots: d.querySelectorAll('div[data-root-id], .bk-Column, .bk-Figure').length};
})()"""


# What the page shows besides, for a timeout's message: every iframe's
# source, the main area's tabs, the URL in the panel's dashboard box.
PAGE = """(() => ({
  iframes: [...document.querySelectorAll('iframe')].map(f => f.src),
  tabs: [...document.querySelectorAll('#jp-main-dock-panel .lm-TabBar-tabLabel')].map(e => e.textContent),
  url: [...document.querySelectorAll('.dask-DashboardLauncher input, .dask-URLInput input')].map(e => e.value),
  buttons: [...document.querySelectorAll('.dask-DashboardListing-item button')].map(b => [b.value, b.disabled]),
}))()"""


def browse(lab: Lab, names: list[str], select: str, plot: str) -> dict:
    """Headless Chromium, as the test user, opens JupyterLab with the Dask
    panel; waits until the panel lists `names`, selects the cluster of id
    `select`, waits for its live plot buttons, opens `plot`, keeps a
    screenshot (ARTIFACTS/labextension.png) and returns what the page
    showed."""
    chromium = shutil.which("chromium")
    assert chromium, "Debian's chromium (scripts/setup installs it)"
    lab.api("PUT", "/lab/api/workspaces/dask", WORKSPACE, expect=204)
    # No "get notified about Jupyter news?" over the picture.
    lab.api("PUT", "/lab/api/settings/@jupyterlab/apputils-extension:notification",
            {"raw": json.dumps({"fetchNews": "false"})}, expect=204)
    profile = sb.HOME / "chromium"
    sb.as_user(["rm", "-rf", str(profile)])
    proc = subprocess.Popen(sb.user_command([chromium, "--headless=new", "--no-first-run", "--no-default-browser-check",
                                             "--disable-gpu", "--remote-debugging-port=0", f"--user-data-dir={profile}",
                                             "--window-size=1400,1400", "about:blank"]),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        port = sb.wait_until("Chromium's DevTools port", lambda: (profile / "DevToolsActivePort").exists() and (
            profile / "DevToolsActivePort").read_text().split()[:1], 60, 0.2)[0]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=20) as r:
            page = next(t for t in json.load(r) if t["type"] == "page")
        tab = DevTools(page["webSocketDebuggerUrl"])
        tab.call("Page.navigate", url=f"{lab.base}/lab/workspaces/dask?token={lab.token}")
        seen = {}

        def panel_ready():
            seen["listed"], seen["live"] = tab.eval(LISTED) or [], tab.eval(LIVE_PLOTS) or []
            if set(names) <= set(seen["listed"]) and plot not in seen["live"]:
                # Select the cluster, as a user does: its plots go live.
                # (The panel selects the first cluster by itself, but its
                # restored settings may then empty the dashboard URL: a
                # race of dask-labextension 7.0's start.)
                tab.eval(f"document.querySelector('li[data-cluster-id=\"{select}\"]').click()")
            return set(names) <= set(seen["listed"]) and plot in seen["live"]

        try:
            sb.wait_until("the Dask panel to list the clusters with live plots", panel_ready, 90, 0.5)
        except TimeoutError as e:
            raise AssertionError(f"{e}: {seen}") from None
        seen["plot"] = open_plot(tab, plot, select, seen)
        assert f"/dask/dashboard/{select}/" in seen["plot"]["src"], seen
        time.sleep(2)  # its first data
        png = base64.b64decode(tab.call("Page.captureScreenshot", format="png")["data"])
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / "labextension.png").write_bytes(png)
        check_picture(png)
        try:
            tab.call("Browser.close")
        except Exception:
            pass
        proc.wait(20)
        return seen
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def open_plot(tab: DevTools, plot: str, select: str, seen: dict) -> dict:
    """Clicks the panel's `plot` button and waits for the plot's page in
    its iframe. A click can fall on a button the panel is re-rendering
    (it re-renders on every cluster poll, and under load a poll can land
    between the query and the click); the click is repeated, as a user
    would, while no dashboard iframe has appeared, the cluster selected
    again first (the panel's URL can still be settling from its start)."""
    # Says what it found: a button that is missing or disabled takes no click.
    click = (f"(() => {{ const b = document.querySelector('.dask-DashboardListing-item button[value=\"{plot}\"]');"
             " if (!b) return 'no button'; if (b.disabled) return 'disabled'; b.click(); return 'clicked'; })()")
    reselect = f"document.querySelector('li[data-cluster-id=\"{select}\"]').click()"
    clicked = [0.0]

    def shown():
        seen["last_plot_state"] = state = tab.eval(PLOT)
        if state and state["roots"]:
            return state
        if state is None and time.monotonic() - clicked[0] > 10:
            if clicked[0]:
                tab.eval(reselect)
            said = tab.eval(click)
            clicked[0] = time.monotonic()
            seen.setdefault("plot_clicks", []).append(said)
        return None

    try:
        return sb.wait_until(f"the {plot} plot", shown, 120, 0.5)
    except TimeoutError as e:
        seen["page"] = tab.eval(PAGE)
        raise AssertionError(f"{e}: {seen}") from None


def check_picture(png: bytes) -> None:
    """A real picture of the page: PNG, window-sized, not blank (many
    colours, dark text on light)."""
    from PIL import Image

    img = Image.open(io.BytesIO(png))
    assert img.format == "PNG" and img.width == 1400 and img.height > 1000, (img.format, img.size)
    colours = img.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours and len(colours) > 100, f"{len(colours or [])} colours: a blank page?"
    dark, light = img.convert("L").getextrema()
    assert dark < 64 and light > 192, (dark, light)

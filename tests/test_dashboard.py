"""A cluster's dashboard is private to its owner (issue 25): every page of
the scheduler's and the workers' HTTP servers (status, logs, exceptions,
call stacks, identity, metrics) answers another user 403 with nothing of
the cluster in it; the owner's link (`SpankCluster.dashboard_link`,
`dask-spank status`) opens it."""
from __future__ import annotations

import json
import re
import subprocess

import sandboxlib as sb
from test_keeper import ds

# Run as another user: GET each URL (no cookie, no token), print status and body.
PROBE = r"""
import json, sys, urllib.request, urllib.error
out = []
for url in sys.argv[1:]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            out.append([url, r.status, r.read(4096).decode(errors="replace")])
    except urllib.error.HTTPError as e:
        out.append([url, e.code, e.read(4096).decode(errors="replace")])
    except OSError as e:
        out.append([url, 0, str(e)])
print(json.dumps(out))
"""

# Run as the owner: the cluster's link, followed as a browser would (cookie).
OWNER = r"""
import http.cookiejar, sys, urllib.request
from dask_spank import SpankCluster
link = SpankCluster(sys.argv[1]).dashboard_link
opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
with opener.open(link, timeout=20) as r:
    page = r.read().decode(errors="replace")
    print(link)
    print(r.status, r.geturl())
with opener.open(sys.argv[2], timeout=20) as r:
    print(r.status, len(r.read()))
"""


def probe_as_other(urls: list[str]) -> list:
    sb.other_user()
    p = subprocess.run(["runuser", "-u", sb.OTHER_USER, "--", "/usr/bin/python3", "-c", PROBE, *urls],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def test_the_dashboard_is_private_to_its_owner(cluster_name):
    ds("up", cluster_name, "--workers", "1", "--wait", "100", "--timeout", "180")
    c = sb.client(cluster_name)
    try:
        info = c.scheduler_info()
        sched_host = re.match(r"\w+://([^:]+):", info["address"]).group(1)
        base = f"http://{sched_host}:{info['services']['dashboard']}"
        [(waddr, w)] = info["workers"].items()
        wbase = f"http://{re.match(r'[a-z]+://([^:]+):', waddr).group(1)}:{w['services']['dashboard']}"
        urls = [f"{base}{p}" for p in ("/status", "/info/main/logs.html", "/info/main/exceptions.html",
                                       f"/info/call-stacks/{waddr}", "/json/identity.json", "/sitemap.json",
                                       "/metrics", "/individual-plots.json", "/status?token=wrong",
                                       # Not ASCII: refused, not a 500 with a traceback.
                                       "/status?token=%C3%A9t%C3%A9",
                                       # The token as a path prefix (for proxies): a wrong
                                       # one, none, one not ASCII.
                                       f"/dask-spank-token/{'0' * 48}/status", "/dask-spank-token//status",
                                       "/dask-spank-token/status", "/dask-spank-token/%C3%A9t%C3%A9/status")]
        urls += [f"{wbase}{p}" for p in ("/status", "/info/main/logs.html", "/metrics", "/sitemap.json")]
        for url, status, body in probe_as_other(urls):
            assert status == 403, (url, status, body[:300])
            assert cluster_name not in body and waddr not in body, (url, body[:300])
        # The owner's link opens the dashboard (the token becomes a cookie,
        # the URL loses it), and the cookie opens the other pages.
        p = sb.as_user([str(sb.VENV / "bin" / "python"), "-c", OWNER, cluster_name,
                        f"{base}/info/main/logs.html"], check=False, timeout=120)
        assert p.returncode == 0, (p.stdout, p.stderr[-2000:])
        link, landed, other = p.stdout.strip().splitlines()
        assert re.fullmatch(rf"{re.escape(base)}/status\?token=[0-9a-f]{{48}}", link), link
        assert landed == f"200 {base}/status", landed
        assert other.startswith("200 "), other
        # The token as the path's prefix opens every page too, without a
        # cookie (what proxies need).
        token = link.rsplit("=", 1)[1]
        p = sb.as_user([str(sb.VENV / "bin" / "python"), "-c", PROBE, f"{base}/dask-spank-token/{token}/status",
                        f"{base}/dask-spank-token/{token}/info/main/logs.html",
                        f"{base}/dask-spank-token/{token}/individual-plots.json"], timeout=120)
        for url, status, body in json.loads(p.stdout):
            assert status == 200, (url, status, body[:300])
        # `status` gives the owner the same link.
        assert link in ds("status", cluster_name).stdout
    finally:
        c.close()
    ds("down", cluster_name)

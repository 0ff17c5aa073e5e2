"""Debian's Firefox ESR, headless, driven over Marionette (its own remote protocol).

Playwright only drives its own patched Firefox build and Debian ships no geckodriver, but every
Firefox speaks Marionette when started with `--marionette`, and Mozilla's `marionette_driver`
client talks to it directly. The profile gives Firefox a fake microphone (a tone: unlike
Chromium, Firefox cannot play a wav file as its fake device) and keeps it off the network.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import time
from pathlib import Path

from tests.support import free_port

FIREFOX = shutil.which("firefox-esr") or shutil.which("firefox")
OFFLINE = "http://127.0.0.1:9/"  # discard port: any background fetch fails at once, locally

PREFS = {
    # fake media devices and no permission prompt
    "media.navigator.streams.fake": True,
    "media.navigator.permission.disabled": True,
    "media.autoplay.default": 0,
    # hide host addresses behind mDNS names, as Firefox does for pages it has not granted a
    # capture permission: the server must connect anyway (telephony/webrtc/offer.py)
    "media.peerconnection.ice.obfuscate_host_addresses": True,
    # no background traffic: updates, telemetry, experiments, safe browsing, plug-in downloads
    "app.update.disabledForTesting": True,
    "app.normandy.enabled": False,
    "messaging-system.rsexperimentloader.enabled": False,
    "services.settings.server": OFFLINE + "v1",
    "toolkit.telemetry.enabled": False,
    "datareporting.policy.dataSubmissionEnabled": False,
    "datareporting.healthreport.uploadEnabled": False,
    "browser.safebrowsing.malware.enabled": False,
    "browser.safebrowsing.phishing.enabled": False,
    "browser.safebrowsing.downloads.enabled": False,
    "browser.safebrowsing.blockedURIs.enabled": False,
    "extensions.update.enabled": False,
    "extensions.getAddons.cache.enabled": False,
    "media.gmp-manager.updateEnabled": False,
    "media.gmp-manager.url": OFFLINE,
    "network.captive-portal-service.enabled": False,
    "network.connectivity-service.enabled": False,
    "network.dns.disablePrefetch": True,
    "network.prefetch-next": False,
    "network.http.speculative-parallel-limit": 0,
    "browser.region.network.url": "",
    "geo.provider.network.url": "",
    "browser.startup.page": 0,
    "browser.startup.homepage_override.mstone": "ignore",
    "browser.newtabpage.enabled": False,
}


class Firefox:
    """One headless Firefox with a throw-away profile; `.m` is the Marionette session."""

    def __init__(self, workdir: Path):
        from marionette_driver.marionette import Marionette

        profile = workdir / "firefox-profile"
        profile.mkdir(parents=True, exist_ok=True)
        port = free_port()
        prefs = dict(PREFS, **{"marionette.port": port})
        (profile / "user.js").write_text("".join(f'user_pref("{k}", {json.dumps(v)});\n' for k, v in prefs.items()))
        self.log_path = workdir / "firefox.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen([FIREFOX, "--headless", "--marionette", "--no-remote", "--profile", str(profile)],
                                     stdout=self._log, stderr=subprocess.STDOUT)
        try:
            self.m = Marionette(host="127.0.0.1", port=port, startup_timeout=60)
            self.m.start_session()
        except Exception:
            self.close()
            raise

    def page_value(self, expr: str):
        """Evaluate `expr` in the page's own scope (Marionette scripts see the page through
        Xray wrappers, so page globals are reached via wrappedJSObject)."""
        return self.m.execute_script(f"const w = window.wrappedJSObject; return JSON.stringify({expr});")

    def wait_for(self, expr: str, timeout: float = 30.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = json.loads(self.page_value(expr) or "null")
            if value:
                return value
            time.sleep(0.2)
        raise TimeoutError(f"{expr} still false after {timeout} s; page state: {self.page_value('w.__call')}")

    def screenshot(self, path: Path) -> None:
        path.write_bytes(base64.b64decode(self.m.screenshot()))

    def close(self) -> None:
        try:
            if getattr(self, "m", None) is not None:
                self.m.delete_session()
        except Exception:
            pass
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self._log.close()

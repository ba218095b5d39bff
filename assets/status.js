// quotagate status page: live updates without a reload.
// Every LIVE_INTERVAL ms, asks the server for the freshly rendered pools (an HTML fragment, so
// all rendering stays on the server) and swaps it in. Pauses while the tab is hidden; backs off
// while the gateway does not answer; goes back to the login form when the session has ended.
(() => {
  "use strict";
  const main = document.getElementById("pools");
  const live = document.getElementById("live");
  if (!main || !live) return;
  const url = main.dataset.live;
  const every = Number(main.dataset.interval) || 2000;
  let timer = null;
  let failures = 0;
  let running = false;

  function show(state, text) {
    live.className = "live " + state;
    live.textContent = text;
  }

  function schedule() {
    if (timer !== null || document.hidden) return;
    const wait = failures ? Math.min(every * 2 ** failures, 30000) : every;
    timer = setTimeout(tick, wait);
  }

  async function tick() {
    timer = null;
    if (running || document.hidden) return;
    running = true;
    try {
      const response = await fetch(url, {
        credentials: "same-origin",
        cache: "no-store",
        headers: { Accept: "text/html" },
      });
      if (response.status === 401) {
        // The session expired or the admin token was rotated: show the login form.
        window.location.replace("/");
        return;
      }
      if (!response.ok) throw new Error("status " + response.status);
      main.innerHTML = await response.text();
      failures = 0;
      show("ok", "live");
      document.dispatchEvent(new CustomEvent("quotagate:updated"));
    } catch (e) {
      failures += 1;
      show("stale", "reconnecting…");
    } finally {
      running = false;
    }
    schedule();
  }

  document.addEventListener("visibilitychange", () => {
    if (document.hidden) {
      clearTimeout(timer);
      timer = null;
      show("paused", "paused");
    } else {
      tick();
    }
  });
  show("ok", "live");
  schedule();
})();

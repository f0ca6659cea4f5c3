// Switchyard dashboard: refreshes the page's main part every two seconds,
// turns request counters into rates, and sends the buttons to the API.
"use strict";
(() => {
  const TOKEN = "switchyard-token";
  const main = document.getElementById("main");
  const live = document.getElementById("live");
  const flash = document.getElementById("flash");
  let readings = new Map();
  // One refresh at a time; a refresh asked for meanwhile runs right after.
  let busy = false;
  let again = false;

  const headers = () => {
    const token = sessionStorage.getItem(TOKEN);
    return token ? { "X-Consul-Token": token } : {};
  };

  const say = (text, bad) => {
    live.textContent = text;
    live.classList.toggle("bad", Boolean(bad));
  };

  const alertBox = (text) => {
    flash.textContent = text;
    flash.hidden = !text;
  };

  // Requests per second per endpoint row, from this reading and the last.
  const rates = () => {
    const now = performance.now();
    const next = new Map();
    for (const row of main.querySelectorAll("tr[data-requests]")) {
      const count = Number(row.dataset.requests);
      const before = readings.get(row.dataset.key);
      next.set(row.dataset.key, [count, now]);
      const cell = row.querySelector(".rate");
      if (cell && before && now > before[1]) {
        const rate = ((count - before[0]) * 1000) / (now - before[1]);
        cell.textContent = rate >= 0 ? rate.toFixed(1) : "–";
      }
    }
    readings = next;
  };

  const refresh = async () => {
    if (busy) {
      again = true;
      return;
    }
    busy = true;
    const url = new URL(location.href);
    url.searchParams.set("fragment", "1");
    const sent = sessionStorage.getItem(TOKEN);
    try {
      const answer = await fetch(url, { headers: headers(), cache: "no-store" });
      const text = await answer.text();
      if (answer.status === 401 && sessionStorage.getItem(TOKEN) !== sent) {
        // The operator typed a new token meanwhile: try that one.
        again = true;
      } else if (answer.status === 401) {
        // The token is missing or no longer known: ask for one.
        sessionStorage.removeItem(TOKEN);
        say("token needed", true);
        if (!document.getElementById("login")) main.innerHTML = text;
      } else if (answer.ok) {
        // Keep open check details open across refreshes.
        const open = new Set(
          [...main.querySelectorAll("details[open]")].map((d) => d.closest("tr")?.dataset.key + "|" + d.querySelector("summary")?.textContent)
        );
        main.innerHTML = text;
        for (const d of main.querySelectorAll("details")) {
          if (open.has(d.closest("tr")?.dataset.key + "|" + d.querySelector("summary")?.textContent)) d.open = true;
        }
        rates();
        say("live · " + new Date().toLocaleTimeString());
      } else {
        say("agent answered " + answer.status, true);
      }
    } catch (err) {
      say("agent unreachable", true);
    } finally {
      busy = false;
      if (again) {
        again = false;
        refresh();
      }
    }
  };

  document.addEventListener("click", async (event) => {
    const button = event.target.closest("button[data-method]");
    if (!button) return;
    button.disabled = true;
    let body;
    if (button.dataset.action === "drain") {
      const deadline = document.getElementById("deadline")?.value;
      body = JSON.stringify(deadline ? { deadline } : {});
    }
    try {
      const answer = await fetch(button.dataset.url, {
        method: button.dataset.method,
        headers: { ...headers(), "Content-Type": "application/json" },
        body,
      });
      alertBox(answer.ok ? "" : `${button.textContent} ${button.dataset.target}: ${answer.status} ${await answer.text()}`);
    } catch (err) {
      alertBox(`${button.textContent} ${button.dataset.target}: agent unreachable`);
    }
    await refresh();
  });

  document.addEventListener("submit", (event) => {
    if (event.target.id !== "login") return;
    event.preventDefault();
    const token = new FormData(event.target).get("token");
    if (token) sessionStorage.setItem(TOKEN, token);
    alertBox("");
    main.innerHTML = "";
    refresh();
  });

  rates();
  if (!document.getElementById("login") || sessionStorage.getItem(TOKEN)) refresh();
  setInterval(() => {
    if (!document.getElementById("login")) refresh();
  }, 2000);
})();

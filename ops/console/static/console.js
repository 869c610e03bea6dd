// driftwarden console: the live alert list. Every text from the collector goes in with
// textContent (never innerHTML): paths, argv and names come from containers.
"use strict";
(function () {
  const table = document.getElementById("alerts");
  if (!table || !table.dataset.stream || !window.EventSource) {
    return;
  }
  const body = table.tBodies[0];
  const status = document.getElementById("live-status");
  const empty = document.getElementById("no-alerts");
  const actions = document.getElementById("live-actions");
  const columns = ["time", "kind", "severity", "mode", "container", "image", "node", "count",
                   "reason"];
  const classes = {severity: (a) => "sev-" + a.severity, container: () => "container",
                   image: () => "image", reason: () => "reason"};

  function setStatus(state, text) {
    status.dataset.state = state;
    status.textContent = text;
  }

  function row(alert) {
    const tr = document.createElement("tr");
    tr.dataset.alertId = alert.id;
    for (const name of columns) {
      const td = document.createElement("td");
      td.textContent = String(alert[name] ?? "");
      if (classes[name]) {
        td.className = classes[name](alert);
      }
      tr.appendChild(td);
    }
    const td = document.createElement("td");
    const link = document.createElement("a");
    link.href = "/alerts/" + encodeURIComponent(alert.id);
    link.textContent = "Details";
    td.appendChild(link);
    tr.appendChild(td);
    return tr;
  }

  function findRow(id) {
    for (const tr of body.rows) {
      if (tr.dataset.alertId === id) {
        return tr;
      }
    }
    return null;
  }

  const source = new EventSource(table.dataset.stream);
  source.addEventListener("alert", (event) => {
    const alert = JSON.parse(event.data);
    const old = findRow(alert.id);
    if (old) {
      old.remove();
    }
    body.insertBefore(row(alert), body.firstChild);
    empty.hidden = true;
  });
  source.addEventListener("action", (event) => {
    const action = JSON.parse(event.data);
    const li = document.createElement("li");
    li.textContent = [action.type, action.container_name || action.container_id.slice(0, 12),
                      "on", action.node, ":", action.status, action.message].join(" ");
    actions.insertBefore(li, actions.firstChild);
  });
  source.addEventListener("status", (event) => {
    const data = JSON.parse(event.data);
    setStatus(data.state, data.text);
  });
  source.addEventListener("error", () => {
    if (source.readyState !== EventSource.OPEN) {
      setStatus("unavailable", "disconnected from the console; retrying…");
    }
  });
})();

// qanafed dashboard: reload the page when the data behind it changes (polls the JSON API).
(function () {
  "use strict";
  var body = document.body;
  var url = body.dataset.poll;
  var version = body.dataset.version;
  if (!url) { return; }
  var interval = Number(body.dataset.interval) || 5000;
  function check() {
    fetch(url, { credentials: "same-origin", cache: "no-store" })
      .then(function (r) {
        if (r.status === 401) { window.location.reload(); return null; }
        return r.ok ? r.json() : null;
      })
      .then(function (data) {
        if (data && data.version && data.version !== version) { window.location.reload(); }
      })
      .catch(function () { /* the dashboard is restarting: try again next time */ })
      .then(function () { window.setTimeout(check, interval); });
  }
  window.setTimeout(check, interval);
})();

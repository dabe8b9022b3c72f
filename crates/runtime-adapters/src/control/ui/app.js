// The plba operator console: refreshes the live part of a page without reloading it.
// Everything works without this script; it only saves the operator a reload.
(function () {
  "use strict";
  var live = document.getElementById("live");
  if (!live || !live.dataset.src) { return; }
  var every = 2000;
  function refresh() {
    // Never pull the page from under a keyboard user's focus.
    if (live.contains(document.activeElement) && document.activeElement !== live) {
      setTimeout(refresh, every);
      return;
    }
    fetch(live.dataset.src, { credentials: "same-origin", headers: { "Accept": "text/html" }, redirect: "manual" })
      .then(function (r) {
        if (r.type === "opaqueredirect" || r.status === 401 || r.status === 303) {
          window.location.reload();
          return null;
        }
        return r.ok ? r.text() : null;
      })
      .then(function (html) {
        if (html !== null && html !== undefined) {
          live.innerHTML = html;
          live.dataset.refreshed = String(Date.now());
        }
      })
      .catch(function () { /* the next tick tries again */ })
      .then(function () { setTimeout(refresh, every); });
  }
  setTimeout(refresh, every);
})();

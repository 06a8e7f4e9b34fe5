(function () {
  "use strict";
  function openTarget() {
    var id = decodeURIComponent(window.location.hash.slice(1));
    var el = id ? document.getElementById(id) : null;
    if (!el) { return; }
    for (var d = el.closest("details"); d; d = d.parentElement ? d.parentElement.closest("details") : null) {
      d.open = true;
    }
    el.scrollIntoView({block: "start"});
  }
  function selectText(node) {
    var range = document.createRange();
    range.selectNodeContents(node);
    var sel = window.getSelection();
    sel.removeAllRanges();
    sel.addRange(range);
  }
  function init() {
    document.querySelectorAll("button[data-expand]").forEach(function (b) {
      b.addEventListener("click", function () {
        var open = b.getAttribute("data-expand") === "open";
        var scope = document.getElementById(b.getAttribute("data-scope")) || document;
        scope.querySelectorAll("details.finding").forEach(function (d) { d.open = open; });
      });
    });
    document.querySelectorAll("button.copy").forEach(function (b) {
      b.addEventListener("click", function () {
        var code = document.getElementById(b.getAttribute("data-for"));
        if (!code) { return; }
        selectText(code);
        if (navigator.clipboard && window.isSecureContext) {
          navigator.clipboard.writeText(code.textContent).then(function () { b.textContent = "copied"; });
        } else {
          try { document.execCommand("copy"); b.textContent = "copied"; } catch (e) { /* selected */ }
        }
      });
    });
    window.addEventListener("hashchange", openTarget);
    openTarget();
  }
  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", init);
  } else {
    init();
  }
}());

/* qPKI — small progressive enhancements. Every page works without this file.
 * Never changes the value of an input (codes are sent exactly as typed). */
(function () {
  "use strict";

  // Ask before destructive actions: <button data-confirm="..."> or <form data-confirm="...">.
  function setupConfirm() {
    document.addEventListener("submit", function (event) {
      var form = event.target;
      if (!(form instanceof HTMLFormElement)) return;
      var submitter = event.submitter || null;
      var message = (submitter && submitter.getAttribute("data-confirm")) || form.getAttribute("data-confirm");
      if (!message && !submitter) {
        // Older browsers without event.submitter: a form with a single confirm button.
        var only = form.querySelectorAll("button[data-confirm], input[type=submit][data-confirm]");
        if (only.length === 1) message = only[0].getAttribute("data-confirm");
      }
      if (message && !window.confirm(message)) {
        event.preventDefault();
      }
    });
  }

  function setStatus(el, text) {
    if (!el) return;
    el.textContent = "";
    // Re-set after a tick so screen readers announce a repeated message.
    window.setTimeout(function () { el.textContent = text; }, 50);
  }

  function selectText(node) {
    var selection = window.getSelection && window.getSelection();
    if (!selection || !document.createRange) return;
    var range = document.createRange();
    range.selectNodeContents(node);
    selection.removeAllRanges();
    selection.addRange(range);
  }

  // Copy the manual TOTP key without its grouping spaces.
  function setupCopySecret() {
    var button = document.getElementById("copy-secret");
    var secret = document.getElementById("mfa-secret");
    if (!button || !secret) return;
    var status = document.getElementById("copy-status");
    function done(text) {
      setStatus(status, text);
    }

    function legacyCopy(text) {
      var area = document.createElement("textarea");
      area.value = text;
      area.setAttribute("readonly", "");
      area.setAttribute("aria-hidden", "true");
      area.className = "visually-hidden";
      document.body.appendChild(area);
      var ok = false;
      try {
        area.select();
        ok = !!(document.execCommand && document.execCommand("copy"));
      } catch (e) {
        ok = false;
      }
      document.body.removeChild(area);
      button.focus();
      return ok;
    }

    function fallback(text) {
      if (legacyCopy(text)) {
        done("Copied");
      } else {
        selectText(secret);
        setStatus(status, "Key selected. Press Ctrl+C (or \u2318C) to copy it.");
      }
    }

    button.addEventListener("click", function () {
      var text = (secret.textContent || "").replace(/\s+/g, "");
      if (navigator.clipboard && window.isSecureContext) {
        navigator.clipboard.writeText(text).then(
          function () { done("Copied"); },
          function () { fallback(text); }
        );
      } else {
        fallback(text);
      }
    });
  }

  function setupPrint() {
    var button = document.getElementById("print-codes");
    if (!button) return;
    button.addEventListener("click", function () { window.print(); });
  }

  function init() {
    setupConfirm();
    setupCopySecret();
    setupPrint();
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", init);
  } else {
    init();
  }
})();

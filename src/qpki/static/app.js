/* qPKI — small progressive enhancements. Every page works without this file.
 * Never changes the value of an input (codes are sent exactly as typed). */
(function () {
  "use strict";

  // Ask before a destructive action whose page does not already say what it does:
  // <button data-confirm="..."> or <form data-confirm="...">.
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

  // Copy text to the clipboard: the async clipboard API on a secure page, else the legacy
  // execCommand; if both fail, select the text so the person can press Ctrl+C.
  function copyText(text, button, status, node) {
    function legacyCopy() {
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
    function fallback() {
      if (legacyCopy()) {
        setStatus(status, "Copied");
      } else {
        selectText(node);
        setStatus(status, "Selected. Press Ctrl+C (or \u2318C) to copy.");
      }
    }
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(text).then(
        function () { setStatus(status, "Copied"); },
        fallback
      );
    } else {
      fallback();
    }
  }

  // A button that only works with this script starts hidden; show it once it is wired.
  function enable(button) {
    button.hidden = false;
    button.removeAttribute("hidden");
  }

  // Copy the manual TOTP key without its grouping spaces.
  function setupCopySecret() {
    var button = document.getElementById("copy-secret");
    var secret = document.getElementById("mfa-secret");
    if (!button || !secret) return;
    var status = document.getElementById("copy-status");
    button.addEventListener("click", function () {
      copyText((secret.textContent || "").replace(/\s+/g, ""), button, status, secret);
    });
    enable(button);
  }

  // Copy the backup codes, one per line.
  function setupCopyCodes() {
    var button = document.getElementById("copy-codes");
    var list = document.getElementById("backup-codes");
    if (!button || !list) return;
    var status = document.getElementById("copy-codes-status");
    button.addEventListener("click", function () {
      var codes = Array.prototype.map.call(list.querySelectorAll("li"), function (li) {
        return (li.textContent || "").trim();
      });
      copyText(codes.join("\n") + "\n", button, status, list);
    });
    enable(button);
  }

  function setupPrint() {
    var button = document.getElementById("print-codes");
    if (!button || typeof window.print !== "function") return;
    button.addEventListener("click", function () { window.print(); });
    enable(button);
  }

  // On narrow screens tables show as one card per row (style.css); each cell is labelled by
  // its column header. Templates give data-label; this fills in any they do not.
  function labelCells() {
    var tables = document.querySelectorAll(".table-wrap table");
    Array.prototype.forEach.call(tables, function (table) {
      var heads = table.querySelectorAll("thead th");
      if (!heads.length) return;
      var names = Array.prototype.map.call(heads, function (th) {
        return (th.textContent || "").trim();
      });
      Array.prototype.forEach.call(table.querySelectorAll("tbody tr"), function (row) {
        Array.prototype.forEach.call(row.children, function (cell, index) {
          if (!cell.hasAttribute("data-label") && names[index]) {
            cell.setAttribute("data-label", names[index]);
          }
        });
      });
    });
  }

  // <table class="sortable">: each column header becomes a button that sorts the rows shown
  // (by a cell's data-sort, else its text); aria-sort tells screen readers the order.
  function setupSortable() {
    var tables = document.querySelectorAll("table.sortable");
    Array.prototype.forEach.call(tables, function (table) {
      var heads = table.querySelectorAll("thead th");
      var body = table.tBodies[0];
      if (!body) return;
      Array.prototype.forEach.call(heads, function (th, index) {
        var label = (th.textContent || "").trim();
        var button = document.createElement("button");
        button.type = "button";
        button.className = "sort-button";
        button.textContent = label;
        var icon = document.createElement("span");
        icon.className = "sort-icon";
        icon.setAttribute("aria-hidden", "true");
        button.appendChild(icon);
        th.textContent = "";
        th.appendChild(button);
        if (index === 0) {
          th.setAttribute("aria-sort", "ascending");
          icon.textContent = "\u25B2";
        }
        button.addEventListener("click", function () {
          var ascending = th.getAttribute("aria-sort") !== "ascending";
          Array.prototype.forEach.call(heads, function (other) {
            other.removeAttribute("aria-sort");
            var i = other.querySelector(".sort-icon");
            if (i) i.textContent = "";
          });
          th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
          icon.textContent = ascending ? "\u25B2" : "\u25BC";
          var rows = Array.prototype.slice.call(body.rows);
          function key(row) {
            var cell = row.children[index];
            if (!cell) return "";
            var value = cell.getAttribute("data-sort");
            return (value !== null ? value : (cell.textContent || "").trim()).toLowerCase();
          }
          rows.sort(function (a, b) {
            var x = key(a), y = key(b);
            // Empty values (never signed in, no email) last in either order.
            if (x === "" || x === "\u2014" || x === "never") return (y === "" || y === "\u2014" || y === "never") ? 0 : 1;
            if (y === "" || y === "\u2014" || y === "never") return -1;
            var order = x.localeCompare(y, undefined, { numeric: true });
            return ascending ? order : -order;
          });
          rows.forEach(function (row) { body.appendChild(row); });
        });
      });
    });
  }

  // "Too many failed attempts. Try again in 30 seconds.": count the wait down on screen, so
  // the page does not go on saying 30 seconds after they have passed. The counting part is
  // aria-live="off": a screen reader heard the message once and is not told every second.
  function setupCountdown() {
    var pattern = /in (\d+) (seconds?|minutes)\./;
    var holders = document.querySelectorAll(".flash.error, .field-error, .callout.error");
    Array.prototype.forEach.call(holders, function (holder) {
      var walker = document.createTreeWalker(holder, NodeFilter.SHOW_TEXT, null);
      var node;
      while ((node = walker.nextNode())) {
        var match = pattern.exec(node.nodeValue);
        if (!match) continue;
        var seconds = Number(match[1]) * (match[2] === "minutes" ? 60 : 1);
        var end = Date.now() + seconds * 1000;
        var rest = node.splitText(match.index);
        rest.nodeValue = rest.nodeValue.slice(match[0].length);
        var counter = document.createElement("span");
        counter.className = "countdown";
        counter.setAttribute("aria-live", "off");
        counter.textContent = match[0];
        holder = node.parentNode;
        holder.insertBefore(counter, rest);
        tick(counter, end);
        return;
      }
    });

    function tick(counter, end) {
      var timer = window.setInterval(function () {
        var left = Math.ceil((end - Date.now()) / 1000);
        if (left <= 0) {
          counter.textContent = "now.";
          window.clearInterval(timer);
        } else if (left < 90) {
          counter.textContent = "in " + left + " second" + (left === 1 ? "" : "s") + ".";
        } else {
          counter.textContent = "in " + Math.ceil(left / 60) + " minutes.";
        }
      }, 1000);
    }
  }

  function init() {
    setupConfirm();
    setupCopySecret();
    setupCopyCodes();
    setupPrint();
    labelCells();
    setupSortable();
    setupCountdown();
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", init);
  } else {
    init();
  }
})();

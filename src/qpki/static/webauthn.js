/* qPKI — passkeys and security keys (WebAuthn) in the browser.
 *
 * Served from /static (no CDN) under the site's CSP. Pages work without this file: the key
 * buttons stay hidden and the password and code forms are there as before. Options come from
 * the server as JSON (base64url for binary fields); the browser's answer goes back as JSON with
 * the CSRF token in the X-CSRFToken header.
 *
 * Chromium allows one WebAuthn request at a time ("A request is already pending"), so the
 * autofill (conditional) request on the sign-in page is aborted before a button starts a modal
 * one.
 */
(function () {
  "use strict";

  var supported = !!(window.PublicKeyCredential && navigator.credentials);
  var conditional = null; // AbortController of a pending autofill request

  // -- base64url <-> ArrayBuffer --------------------------------------------------------------
  function toBytes(text) {
    var b64 = text.replace(/-/g, "+").replace(/_/g, "/");
    while (b64.length % 4) b64 += "=";
    var raw = window.atob(b64);
    var out = new Uint8Array(raw.length);
    for (var i = 0; i < raw.length; i++) out[i] = raw.charCodeAt(i);
    return out.buffer;
  }

  function toText(buffer) {
    if (!buffer) return null;
    var bytes = new Uint8Array(buffer);
    var raw = "";
    for (var i = 0; i < bytes.length; i++) raw += String.fromCharCode(bytes[i]);
    return window.btoa(raw).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
  }

  function descriptors(list) {
    return (list || []).map(function (d) {
      var out = { type: d.type, id: toBytes(d.id) };
      if (d.transports && d.transports.length) out.transports = d.transports;
      return out;
    });
  }

  function creationOptions(o) {
    var out = Object.assign({}, o);
    out.challenge = toBytes(o.challenge);
    out.user = Object.assign({}, o.user, { id: toBytes(o.user.id) });
    out.excludeCredentials = descriptors(o.excludeCredentials);
    return out;
  }

  function requestOptions(o) {
    var out = Object.assign({}, o);
    out.challenge = toBytes(o.challenge);
    out.allowCredentials = descriptors(o.allowCredentials);
    return out;
  }

  function credentialJSON(cred) {
    var r = cred.response;
    var response = { clientDataJSON: toText(r.clientDataJSON) };
    if (r.attestationObject) {
      response.attestationObject = toText(r.attestationObject);
      response.transports = typeof r.getTransports === "function" ? r.getTransports() : [];
    } else {
      response.authenticatorData = toText(r.authenticatorData);
      response.signature = toText(r.signature);
      if (r.userHandle && r.userHandle.byteLength) response.userHandle = toText(r.userHandle);
    }
    return {
      id: cred.id,
      rawId: toText(cred.rawId),
      type: cred.type,
      response: response,
      authenticatorAttachment: cred.authenticatorAttachment || null,
      clientExtensionResults: cred.getClientExtensionResults ? cred.getClientExtensionResults() : {}
    };
  }

  // -- talking to the server ------------------------------------------------------------------
  function csrfToken() {
    var el = document.getElementById("webauthn-csrf");
    return el ? el.value : "";
  }

  function post(url, body) {
    return fetch(url, {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRFToken": csrfToken() },
      body: JSON.stringify(body || {})
    }).then(function (res) {
      return res.json().then(
        function (data) { data.status = res.status; return data; },
        function () { return { ok: false, status: res.status, error: "The server refused the request (" + res.status + "). Reload the page and try again." }; }
      );
    });
  }

  function say(status, text, isError) {
    if (!status) return;
    status.textContent = "";
    status.classList.toggle("field-error", !!isError);
    window.setTimeout(function () { status.textContent = text; }, 50);
  }

  // What the browser said when the person cancelled or the key refused, in plain words.
  function browserError(err) {
    var name = err && err.name;
    if (name === "NotAllowedError") return "The request was cancelled or timed out. Try again when you are ready.";
    if (name === "InvalidStateError") return "This key is already registered to your account.";
    if (name === "SecurityError") return "Security keys do not work at this address. Use the site's usual address.";
    if (name === "AbortError") return "";
    return "Your browser could not use a security key: " + (err && err.message ? err.message : name || "unknown error");
  }

  function stopConditional() {
    if (conditional) {
      conditional.abort();
      conditional = null;
    }
  }

  // begin -> navigator.credentials.get -> finish; resolves with the server's final answer.
  function authenticate(begin, finish, extra, mediation, signal) {
    return post(begin, {}).then(function (opts) {
      if (!opts.ok) return opts;
      var request = { publicKey: requestOptions(opts.publicKey) };
      if (mediation) request.mediation = mediation;
      if (signal) request.signal = signal;
      return navigator.credentials.get(request).then(function (cred) {
        return post(finish, Object.assign({ credential: credentialJSON(cred) }, extra || {}));
      });
    });
  }

  function wireButton(button, extraFn) {
    var status = document.getElementById("webauthn-status");
    var box = button.closest(".webauthn-box");
    if (box) box.hidden = false;
    button.addEventListener("click", function () {
      stopConditional();
      button.disabled = true;
      say(status, "Follow your browser's prompt to use your key…");
      authenticate(button.getAttribute("data-begin"), button.getAttribute("data-finish"), extraFn ? extraFn() : {})
        .then(function (done) {
          if (done.ok && done.redirect) {
            window.location.assign(done.redirect);
            return;
          }
          if (done.reauth) {
            window.location.assign(done.reauth);
            return;
          }
          button.disabled = false;
          say(status, done.error || "That did not work. Try again.", true);
        })
        .catch(function (err) {
          button.disabled = false;
          var text = browserError(err);
          if (text) say(status, text, true);
        });
    });
  }

  // -- the pages ------------------------------------------------------------------------------
  function setupRegister() {
    var box = document.getElementById("webauthn-add");
    var button = document.getElementById("webauthn-register");
    if (!box || !button) return;
    var status = document.getElementById("webauthn-status");
    var note = box.querySelector(".webauthn-nojs");
    if (!supported) {
      button.disabled = true;
      if (note) note.textContent = "This browser cannot use security keys or passkeys.";
      return;
    }
    if (note) note.hidden = true;
    button.addEventListener("click", function () {
      var name = (document.getElementById("webauthn-name").value || "").trim();
      var reauth = box.getAttribute("data-reauth");
      if (reauth) {
        // Adding a key is a step-up action: confirm it is you first, then come back.
        window.location.assign(reauth);
        return;
      }
      button.disabled = true;
      say(status, "Follow your browser's prompt to add your key…");
      post(box.getAttribute("data-begin"), { name: name })
        .then(function (opts) {
          if (!opts.ok) return opts;
          return navigator.credentials.create({ publicKey: creationOptions(opts.publicKey) }).then(function (cred) {
            return post(box.getAttribute("data-finish"), { credential: credentialJSON(cred) });
          });
        })
        .then(function (done) {
          if (done.reauth) {
            window.location.assign(done.reauth);
            return;
          }
          button.disabled = false;
          if (!done.ok) {
            say(status, done.error || "That did not work. Try again.", true);
            return;
          }
          if (done.backup_codes && done.backup_codes.length) {
            showCodes(done.backup_codes);
            say(status, done.message);
            return;
          }
          window.location.reload();
        })
        .catch(function (err) {
          button.disabled = false;
          var text = browserError(err);
          if (text) say(status, text, true);
        });
    });
  }

  function showCodes(codes) {
    var section = document.getElementById("new-backup-codes");
    var list = document.getElementById("backup-codes");
    if (!section || !list) return;
    list.textContent = "";
    codes.forEach(function (code) {
      var li = document.createElement("li");
      li.className = "backup-code";
      li.textContent = code;
      list.appendChild(li);
    });
    section.hidden = false;
  }

  function setupVerify() {
    var button = document.getElementById("webauthn-verify");
    if (!button || !supported) return;
    wireButton(button, function () {
      var remember = document.getElementById("remember_device");
      return { remember_device: !!(remember && remember.checked) };
    });
  }

  function setupReauth() {
    var button = document.getElementById("webauthn-reauth");
    if (!button || !supported) return;
    wireButton(button, function () {
      var password = document.getElementById("password");
      var next = document.querySelector("input[name=next]");
      return {
        password: password ? password.value : "",
        next: next ? next.value : ""
      };
    });
  }

  function setupPasswordless() {
    var button = document.getElementById("passkey-signin");
    if (!button || !supported) return;
    var next = function () {
      var field = document.querySelector("input[name=next]");
      return { next: field ? field.value : "" };
    };
    wireButton(button, next);
    // Autofill: offer passkeys in the username field's suggestions where the browser can.
    if (typeof PublicKeyCredential.isConditionalMediationAvailable !== "function") return;
    PublicKeyCredential.isConditionalMediationAvailable().then(function (available) {
      if (!available) return;
      conditional = new AbortController();
      var status = document.getElementById("webauthn-status");
      authenticate(button.getAttribute("data-begin"), button.getAttribute("data-finish"), next(), "conditional", conditional.signal)
        .then(function (done) {
          if (done.ok && done.redirect) {
            window.location.assign(done.redirect);
          } else if (done.error) {
            say(status, done.error, true);
          }
        })
        .catch(function (err) {
          var text = browserError(err);
          if (text && err.name !== "NotAllowedError") say(status, text, true);
        });
    });
  }

  function init() {
    setupRegister();
    setupVerify();
    setupReauth();
    setupPasswordless();
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", init);
  } else {
    init();
  }
})();

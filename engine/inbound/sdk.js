/*! Nudge browser snippet: track, page and identify for sites without a Segment SDK.
 *
 *   <script>
 *     window.nudge = window.nudge || [];
 *     nudge.push(["track", "Product Viewed", { product_id: "p1" }]);  // queued until loaded
 *   </script>
 *   <script async src="https://nudge.example/sdk.js" data-write-key="WRITE_KEY"></script>
 *
 * Then nudge.track(event, properties), nudge.page(name, properties),
 * nudge.identify(userId, traits), nudge.reset(), nudge.flush().
 * Options (data-* attributes of the script tag, or nudge.push(["init", {...}])):
 * writeKey, host (default: where sdk.js came from), flushAt (20 events),
 * flushInterval (ms, 2000), cookieDomain.
 *
 * Events are batched in the page and posted to {host}/v1/batch as text/plain (a
 * CORS-safelisted type: no preflight) with the write key in the body, since
 * sendBeacon cannot set an Authorization header. When the page is hidden or
 * left, what is buffered leaves with navigator.sendBeacon.
 */
(function (w, d) {
  "use strict";
  var previous = w.nudge;
  if (previous && previous.loaded) return;
  var queue = Array.isArray(previous) ? previous.slice() : [];

  var script = d.currentScript;
  function attr(name) {
    return script ? script.getAttribute("data-" + name) : null;
  }
  var config = {
    writeKey: attr("write-key") || "",
    host: attr("host") || (script && script.src ? new URL(script.src, w.location.href).origin : ""),
    flushAt: Number(attr("flush-at")) || 20,
    flushInterval: Number(attr("flush-interval")) || 2000,
    cookieDomain: attr("cookie-domain") || ""
  };
  var ANON = "nudge_aid";
  var USER = "nudge_uid";
  var BEACON_BYTES = 60000; // browsers refuse beacons over 64 KB in flight, all together
  // Buffered bytes that send a batch at once: what is left for the beacon when the
  // page is left must fit the 64 KB the browser allows (the rest would be lost).
  var FLUSH_BYTES = 32000;
  var buffer = [];
  var buffered = 0;
  var retrying = []; // batches waiting to be sent again: {batch, timer}
  // keepalive requests may outlive the page, but only 64 KB of them in flight at
  // once; past that a batch goes as a plain request, which dies with the page, so
  // it is kept here until answered, and sent again if the page is left first.
  var kept = 0;
  var sending = [];
  var timer = null;
  var memory = {};

  function byteLength(text) {
    // The browsers' limits count UTF-8 bytes; a string's length counts UTF-16 units.
    return w.TextEncoder ? new w.TextEncoder().encode(text).length : new Blob([text]).size;
  }

  function uuid() {
    if (w.crypto && w.crypto.randomUUID) return w.crypto.randomUUID();
    var b = new Uint8Array(16);
    w.crypto.getRandomValues(b);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    var h = Array.prototype.map.call(b, function (x) { return (x + 256).toString(16).slice(1); });
    return h.slice(0, 4).join("") + "-" + h.slice(4, 6).join("") + "-" + h.slice(6, 8).join("") +
      "-" + h.slice(8, 10).join("") + "-" + h.slice(10).join("");
  }

  function getCookie(name) {
    var parts = d.cookie ? d.cookie.split("; ") : [];
    for (var i = 0; i < parts.length; i++) {
      var eq = parts[i].indexOf("=");
      if (parts[i].slice(0, eq) === name) return decodeURIComponent(parts[i].slice(eq + 1));
    }
    return null;
  }

  function setCookie(name, value, maxAge) {
    var cookie = name + "=" + encodeURIComponent(value) + "; path=/; max-age=" + maxAge +
      "; SameSite=Lax";
    if (config.cookieDomain) cookie += "; domain=" + config.cookieDomain;
    if (w.location.protocol === "https:") cookie += "; Secure";
    d.cookie = cookie;
  }

  function stored(name, value) {
    // localStorage may be missing or refuse (private modes): fall back to this page's memory.
    try {
      if (value === undefined) return w.localStorage.getItem(name);
      if (value === null) w.localStorage.removeItem(name);
      else w.localStorage.setItem(name, value);
    } catch (e) {
      if (value === undefined) return memory[name] || null;
      memory[name] = value;
    }
    return value;
  }

  function anonymousId() {
    var id = getCookie(ANON);
    if (!id) id = uuid();
    setCookie(ANON, id, 365 * 86400); // refreshed on every use: a year since the last visit
    return id;
  }

  function pageProperties() {
    return {
      path: w.location.pathname,
      url: w.location.href,
      search: w.location.search,
      title: d.title,
      referrer: d.referrer
    };
  }

  function context() {
    var zone;
    try { zone = Intl.DateTimeFormat().resolvedOptions().timeZone; } catch (e) { zone = undefined; }
    return {
      library: { name: "nudge-sdk.js", version: "1" },
      page: pageProperties(),
      userAgent: w.navigator.userAgent,
      locale: w.navigator.language,
      timezone: zone
    };
  }

  function enqueue(message) {
    message.messageId = uuid();
    message.timestamp = new Date().toISOString();
    message.anonymousId = anonymousId();
    var user = stored(USER);
    if (user && !message.userId) message.userId = user;
    message.context = context();
    buffer.push(message);
    buffered += byteLength(JSON.stringify(message)) + 1;
    if (buffer.length >= config.flushAt || buffered >= FLUSH_BYTES) flush(false);
    else if (!timer) timer = setTimeout(function () { flush(false); }, config.flushInterval);
  }

  function nextBatch() {
    // As many buffered messages as fit one beacon (at least one).
    var batch = [];
    var size = 200;
    while (buffer.length) {
      var bytes = byteLength(JSON.stringify(buffer[0])) + 1;
      if (batch.length && size + bytes > BEACON_BYTES) break;
      batch.push(buffer.shift());
      size += bytes;
    }
    return batch;
  }

  function post(batch, attempt) {
    var body = JSON.stringify({ batch: batch, sentAt: new Date().toISOString(),
      writeKey: config.writeKey });
    var size = byteLength(body);
    var keepalive = kept + size < BEACON_BYTES;
    var entry = { batch: batch };
    if (keepalive) kept += size;
    else sending.push(entry);
    function settled() {
      if (keepalive) kept -= size;
      else if (sending.indexOf(entry) >= 0) sending.splice(sending.indexOf(entry), 1);
    }
    w.fetch(config.host + "/v1/batch", {
      method: "POST", body: body, keepalive: keepalive,
      credentials: "omit", headers: { "Content-Type": "text/plain" }
    }).then(function (response) {
      settled();
      if (response.status === 429 || response.status >= 500) throw new Error(response.status);
    }, function (error) {
      settled();
      throw error;
    }).catch(function () {
      // Retried with backoff; messageIds make a retry of a delivered batch harmless.
      if (attempt >= 5) return;
      var entry = { batch: batch };
      entry.timer = setTimeout(function () {
        retrying.splice(retrying.indexOf(entry), 1);
        post(batch, attempt + 1);
      }, 1000 * Math.pow(2, attempt));
      retrying.push(entry);
    });
  }

  function flush(leaving) {
    clearTimeout(timer);
    timer = null;
    if (!config.writeKey || !config.host) return; // kept until init names them
    if (leaving && w.navigator.sendBeacon) {
      // What waits for a retry, or is in flight in a request that dies with the
      // page, leaves by beacon too, first. A copy: hidden is not always gone (a tab
      // switch), so its own retry goes on, and a copy that arrives twice is dropped
      // by messageId.
      var pending = retrying.concat(sending);
      for (var i = 0; i < pending.length; i++) {
        var copy = JSON.stringify({ batch: pending[i].batch, sentAt: new Date().toISOString(),
          writeKey: config.writeKey });
        w.navigator.sendBeacon(config.host + "/v1/batch", new Blob([copy], { type: "text/plain" }));
      }
    }
    buffered = 0;
    while (buffer.length) {
      var batch = nextBatch();
      if (leaving && w.navigator.sendBeacon) {
        var body = JSON.stringify({ batch: batch, sentAt: new Date().toISOString(),
          writeKey: config.writeKey });
        var blob = new Blob([body], { type: "text/plain" });
        if (w.navigator.sendBeacon(config.host + "/v1/batch", blob)) continue;
      }
      post(batch, 0);
    }
  }

  var api = {
    loaded: true,
    init: function (options) {
      for (var key in options || {}) {
        if (Object.prototype.hasOwnProperty.call(options, key)) config[key] = options[key];
      }
      if (buffer.length) flush(false);
    },
    track: function (event, properties) {
      enqueue({ type: "track", event: String(event), properties: properties || {} });
    },
    page: function (name, properties) {
      var props = pageProperties();
      for (var key in properties || {}) props[key] = properties[key];
      var message = { type: "page", properties: props };
      if (name) message.name = String(name);
      enqueue(message);
    },
    identify: function (userId, traits) {
      if (userId !== undefined && userId !== null && userId !== "") {
        stored(USER, String(userId));
      }
      enqueue({ type: "identify", userId: stored(USER) || undefined, traits: traits || {} });
    },
    reset: function () {
      stored(USER, null);
      setCookie(ANON, "", 0);
    },
    flush: function () { flush(false); },
    anonymousId: anonymousId,
    push: function (call) {
      // The data-layer form: nudge.push(["track", "Signed Up", {...}]).
      var method = call && api[call[0]];
      if (typeof method === "function" && call[0] !== "push") {
        method.apply(api, Array.prototype.slice.call(call, 1));
      }
    }
  };

  d.addEventListener("visibilitychange", function () {
    if (d.visibilityState === "hidden") flush(true);
  });
  w.addEventListener("pagehide", function () { flush(true); });

  w.nudge = api;
  // Replay what was queued before this loaded: settings first, then calls in order.
  queue.forEach(function (call) { if (call && call[0] === "init") api.push(call); });
  queue.forEach(function (call) { if (call && call[0] !== "init") api.push(call); });
})(window, document);

/*
 * The storefront chat widget of the customer-service platform. No dependencies.
 *
 *   <div id="cs-chat"></div>
 *   <script src="https://assistant.example.com/widget/widget.js" data-tenant="lumen"
 *           data-token-url="/chat-token" data-container="cs-chat" data-lang="zh" defer></script>
 *
 * The shopper's identity comes from the storefront's own backend: data-token-url answers a
 * POST (with the page's cookies) with {"token": "<JWT>"} signed with the tenant's widget
 * secret. The widget never holds an API key. Answers stream (Server-Sent Events over fetch).
 */
(function () {
  "use strict";
  var script = document.currentScript;
  if (!script) { return; }
  var cfg = script.dataset;
  var appUrl = (cfg.appUrl || script.src.replace(/\/widget\/widget\.js(\?.*)?$/, "")).replace(/\/$/, "");
  var lang = (cfg.lang || navigator.language || "en").toLowerCase().indexOf("zh") === 0 ? "zh" : "en";
  var TEXT = {
    en: {title: "Customer service", placeholder: "Type your question", send: "Send",
         handover: "A human colleague is taking over this conversation.",
         failed: "Sorry, the assistant could not answer right now.", denied: "Please sign in again to chat."},
    zh: {title: "在线客服", placeholder: "请输入您的问题", send: "发送",
         handover: "已为您转接人工客服，请稍候。",
         failed: "抱歉，客服助手暂时无法回答。", denied: "请重新登录后再咨询。"}
  }[lang];
  var token = null, tokenExp = 0, sessionId = null, busy = false;

  function el(tag, cls, text) {
    var node = document.createElement(tag);
    if (cls) { node.className = cls; }
    if (text) { node.textContent = text; }
    return node;
  }

  function mount() {
    var root = document.getElementById(cfg.container || "cs-chat");
    if (!root) { return; }
    var box = el("section", "cs-widget");
    box.setAttribute("aria-label", TEXT.title);
    box.setAttribute("lang", lang === "zh" ? "zh-CN" : "en");
    var style = el("style");
    style.textContent = ".cs-widget{font:14px/1.5 system-ui,sans-serif;border:1px solid #ccd;border-radius:8px;" +
      "max-width:420px;display:flex;flex-direction:column;background:#fff}.cs-widget h2{font-size:15px;margin:0;" +
      "padding:8px 12px;background:#234;color:#fff;border-radius:8px 8px 0 0}.cs-log{height:280px;overflow-y:auto;" +
      "padding:8px 12px}.cs-msg{margin:6px 0;white-space:pre-wrap}.cs-me{text-align:right;color:#234}" +
      ".cs-bot{color:#111}.cs-note{color:#a50;font-size:13px}.cs-form{display:flex;border-top:1px solid #ccd}" +
      ".cs-form input{flex:1;border:0;padding:10px;font:inherit}.cs-form button{border:0;padding:0 16px;" +
      "background:#234;color:#fff;font:inherit;cursor:pointer}.cs-form button:focus,.cs-form input:focus{outline:2px solid #58a}";
    var log = el("div", "cs-log");
    log.setAttribute("role", "log");
    log.setAttribute("aria-live", "polite");
    var form = el("form", "cs-form");
    var input = el("input");
    input.type = "text";
    input.placeholder = TEXT.placeholder;
    input.setAttribute("aria-label", TEXT.placeholder);
    input.maxLength = 2000;
    var button = el("button", null, TEXT.send);
    button.type = "submit";
    form.appendChild(input);
    form.appendChild(button);
    box.appendChild(style);
    box.appendChild(el("h2", null, TEXT.title));
    box.appendChild(log);
    box.appendChild(form);
    root.appendChild(box);
    form.addEventListener("submit", function (event) {
      event.preventDefault();
      var message = input.value.trim();
      if (!message || busy) { return; }
      input.value = "";
      say(log, "cs-me", message);
      ask(log, message, button);
    });
  }

  function say(log, cls, text) {
    var node = el("div", "cs-msg " + cls, text);
    log.appendChild(node);
    log.scrollTop = log.scrollHeight;
    return node;
  }

  function claims(jwt) {
    try {
      return JSON.parse(atob(jwt.split(".")[1].replace(/-/g, "+").replace(/_/g, "/")));
    } catch (e) { return {}; }
  }

  function shopperToken(fresh) {
    if (!fresh && token && Date.now() / 1000 < tokenExp - 30) { return Promise.resolve(token); }
    return fetch(cfg.tokenUrl || "/chat-token", {method: "POST", credentials: "same-origin"})
      .then(function (r) { if (!r.ok) { throw new Error("token " + r.status); } return r.json(); })
      .then(function (body) { token = body.token; tokenExp = claims(token).exp || 0; return token; });
  }

  function post(message, jwt) {
    return fetch(appUrl + "/v1/widget/" + encodeURIComponent(cfg.tenant) + "/chat", {
      method: "POST",
      headers: {"Authorization": "Bearer " + jwt, "Content-Type": "application/json"},
      body: JSON.stringify({message: message, session_id: sessionId, stream: true})
    });
  }

  function ask(log, message, button) {
    busy = true;
    button.disabled = true;
    var answer = say(log, "cs-bot", "");
    shopperToken(false)
      .then(function (jwt) { return post(message, jwt); })
      .then(function (reply) {
        // An expired or rotated token: one fresh token, one retry.
        if (reply.status === 401) { return shopperToken(true).then(function (jwt) { return post(message, jwt); }); }
        return reply;
      })
      .then(function (reply) {
        if (reply.status === 401 || reply.status === 403) { throw new Error("denied"); }
        if (!reply.ok || !reply.body) { throw new Error("status " + reply.status); }
        return read(reply.body.getReader(), answer, log);
      })
      .catch(function (err) {
        answer.textContent = err && err.message === "denied" ? TEXT.denied : TEXT.failed;
        answer.className = "cs-msg cs-note";
      })
      .then(function () { busy = false; button.disabled = false; });
  }

  function read(reader, answer, log) {
    var decoder = new TextDecoder(), buffer = "";
    function handle(block) {
      var event = "message", data = "";
      block.split("\n").forEach(function (line) {
        if (line.indexOf("event: ") === 0) { event = line.slice(7); }
        if (line.indexOf("data: ") === 0) { data += line.slice(6); }
      });
      if (!data) { return; }
      var payload = JSON.parse(data);
      if (event === "delta") { answer.textContent += payload.text; }
      if (event === "final") {
        answer.textContent = payload.response;
        sessionId = payload.session_id;
        answer.dataset.outcome = payload.outcome;
        if (payload.outcome === "handover") { say(log, "cs-note cs-handover", TEXT.handover); }
      }
      if (event === "error") { throw new Error(payload.error.code); }
      log.scrollTop = log.scrollHeight;
    }
    function pump() {
      return reader.read().then(function (chunk) {
        if (chunk.done) { return; }
        buffer += decoder.decode(chunk.value, {stream: true});
        var blocks = buffer.split("\n\n");
        buffer = blocks.pop();
        blocks.forEach(handle);
        return pump();
      });
    }
    return pump();
  }

  if (document.readyState === "loading") { document.addEventListener("DOMContentLoaded", mount); } else { mount(); }
})();

/*
 * The operators' console. No dependencies, no CDN: everything is this file and the JSON API.
 * A key's scope decides the pages: an operator key gets its tenant's playground, knowledge,
 * and insights; the admin key gets adapters and tenants and keys, and picks a tenant.
 */
(function () {
  "use strict";
  var T = {
    en: {title: "Customer-service console", key: "API key (operator or admin)", login: "Log in", logout: "Log out",
         playground: "Playground", knowledge: "Knowledge", adapters: "Adapters", insights: "Insights",
         tenants: "Tenants and keys", send: "Send", ask: "Ask as a shopper", sources: "Sources",
         helpful: "Helpful", unhelpful: "Not helpful", thanks: "Feedback recorded.", tenant: "Tenant",
         search: "Search test", question: "Question", decision: "Gate decision", state: "Sources and sync state",
         activate: "Activate", rollback: "Roll back", canary: "Start canary", promote: "Promote", abort: "End canary",
         confirm: "Really do this?", rates: "Rates", daily: "Replies per day", unanswered: "Unanswered questions",
         draft: "Draft a knowledge entry", worst: "Worst-rated answers", approve: "Approve", correct: "Correct",
         create: "Create tenant", persona: "Persona", issue: "Issue key", scope: "Scope", rotate: "Rotate",
         revoke: "Revoke", shown_once: "The key (shown once):", chatNeedsTenantKey:
         "Chat needs a tenant's key: log in with its operator key.", adminOnly: "Needs the platform admin key.",
         done: "Done."},
    zh: {title: "客服平台控制台", key: "API 密钥（运营或管理员）", login: "登录", logout: "退出",
         playground: "对话测试", knowledge: "知识库", adapters: "适配器", insights: "洞察",
         tenants: "租户与密钥", send: "发送", ask: "以顾客身份提问", sources: "引用来源",
         helpful: "有帮助", unhelpful: "没帮助", thanks: "反馈已记录。", tenant: "租户",
         search: "检索测试", question: "问题", decision: "判定", state: "来源与同步状态",
         activate: "启用", rollback: "回滚", canary: "开始灰度", promote: "全量", abort: "结束灰度",
         confirm: "确定执行吗？", rates: "比率", daily: "每日回复", unanswered: "未能回答的问题",
         draft: "起草知识条目", worst: "评价最差的回答", approve: "通过", correct: "修正",
         create: "创建租户", persona: "人设", issue: "签发密钥", scope: "范围", rotate: "轮换",
         revoke: "吊销", shown_once: "密钥（仅显示一次）：", chatNeedsTenantKey: "对话需要租户密钥：请用其运营密钥登录。",
         adminOnly: "需要平台管理员密钥。", done: "完成。"}
  };
  var lang = sessionStorage.getItem("cs-lang") || ((navigator.language || "en").indexOf("zh") === 0 ? "zh" : "en");
  var key = sessionStorage.getItem("cs-key"), who = null, tenant = null, current = "playground";
  var base = location.pathname.replace(/\/console\/?$/, "");

  function t(name) { return T[lang][name] || name; }
  function $(sel, root) { return (root || document).querySelector(sel); }
  function el(tag, attrs, children) {
    var node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) {
      if (k === "text") { node.textContent = attrs[k]; } else if (k === "on") {
        Object.keys(attrs.on).forEach(function (e) { node.addEventListener(e, attrs.on[e]); });
      } else { node.setAttribute(k, attrs[k]); }
    });
    (children || []).forEach(function (c) { node.appendChild(typeof c === "string" ? document.createTextNode(c) : c); });
    return node;
  }
  function api(method, path, body) {
    var init = {method: method, headers: {"X-API-Key": key}};
    if (body !== undefined) { init.headers["Content-Type"] = "application/json"; init.body = JSON.stringify(body); }
    return fetch(base + path, init).then(function (r) {
      if (r.status === 204) { return null; }
      return r.json().then(function (data) {
        if (!r.ok) { throw new Error(r.status + ": " + ((data.error || {}).message || r.statusText)); }
        return data;
      });
    });
  }
  function fmt(v) { return v === null || v === undefined ? "—" : typeof v === "number" ? String(Math.round(v * 1000) / 1000) : String(v); }
  function table(headers, rows) {
    return el("table", {}, [el("thead", {}, [el("tr", {}, headers.map(function (h) { return el("th", {text: h}); }))]),
      el("tbody", {}, rows.map(function (r) { return el("tr", {}, r.map(function (c) {
        return el("td", {}, [typeof c === "object" && c !== null && c.nodeType ? c : fmt(c)]); })); }))]);
  }
  function fail(where) { return function (err) { where.textContent = err.message; where.className = "error"; }; }
  function confirmed() { return window.confirm(t("confirm")); }

  function translate() {
    document.documentElement.lang = lang === "zh" ? "zh-CN" : "en";
    Array.prototype.forEach.call(document.querySelectorAll("[data-t]"), function (n) { n.textContent = t(n.dataset.t); });
    $("#lang").textContent = lang === "zh" ? "English" : "中文";
  }

  function pages() {
    var list = ["playground", "knowledge", "insights"];
    if (who.scope === "admin") { list.push("adapters", "tenants"); }
    return list;
  }

  function tabs() {
    var nav = $("#tabs");
    nav.hidden = false;
    nav.textContent = "";
    nav.setAttribute("role", "tablist");
    pages().forEach(function (p) {
      nav.appendChild(el("button", {type: "button", role: "tab", "aria-selected": String(p === current), id: "tab-" + p,
        text: t(p), on: {click: function () { current = p; render(); }}}));
    });
    if (who.scope === "admin") {
      var pick = el("select", {id: "tenant-pick", "aria-label": t("tenant"), on: {change: function (e) { tenant = e.target.value; render(); }}});
      api("GET", "/admin/tenants").then(function (list) {
        list.forEach(function (x) { pick.appendChild(el("option", {value: x.tenant, text: x.tenant})); });
        if (!tenant && list.length) { tenant = list[0].tenant; render(); }
        pick.value = tenant;
      });
      nav.appendChild(pick);
    }
  }

  function render() {
    translate();
    tabs();
    var main = $("#page");
    main.textContent = "";
    if (!tenant) { return; }
    ({playground: playground, knowledge: knowledge, insights: insights, adapters: adapters, tenants: tenants})[current](main);
  }

  // --- Playground: chat as the tenant's assistant, streaming; sources, scores, feedback -------
  var session = null;
  function playground(main) {
    var box = el("section");
    main.appendChild(box);
    if (who.scope !== "operator") { box.appendChild(el("p", {text: t("chatNeedsTenantKey")})); return; }
    var input = el("textarea", {id: "question", rows: "2", "aria-label": t("ask"), placeholder: t("ask")});
    var out = el("div", {id: "answers"});
    var form = el("form", {on: {submit: function (e) { e.preventDefault(); ask(input.value.trim(), out); input.value = ""; }}},
      [input, el("button", {type: "submit", text: t("send")})]);
    box.appendChild(form);
    main.appendChild(out);
  }
  function ask(question, out) {
    if (!question) { return; }
    var card = el("section", {"class": "turn"}, [el("p", {"class": "meta", text: question})]);
    var answer = el("div", {"class": "answer", "aria-live": "polite"});
    card.appendChild(answer);
    out.prepend(card);
    var user = "console-" + who.key_id;
    fetch(base + "/v1/chat", {method: "POST", headers: {"X-API-Key": key, "Content-Type": "application/json"},
      body: JSON.stringify({user_id: user, message: question, session_id: session, stream: true})})
      .then(function (r) {
        if (!r.ok) { return r.json().then(function (d) { throw new Error(r.status + ": " + d.error.message); }); }
        var reader = r.body.getReader(), decoder = new TextDecoder(), buffer = "";
        function pump() {
          return reader.read().then(function (chunk) {
            if (chunk.done) { return; }
            buffer += decoder.decode(chunk.value, {stream: true});
            var blocks = buffer.split("\n\n");
            buffer = blocks.pop();
            blocks.forEach(function (block) {
              var event = (block.match(/^event: (.*)$/m) || [])[1], data = (block.match(/^data: (.*)$/m) || [])[1];
              if (!data) { return; }
              var payload = JSON.parse(data);
              if (event === "delta") { answer.textContent += payload.text; }
              if (event === "final") { session = payload.session_id; answer.textContent = payload.response; details(card, question, payload, user); }
              if (event === "error") { throw new Error(payload.error.message); }
            });
            return pump();
          });
        }
        return pump();
      })
      .catch(fail(answer));
  }
  function details(card, question, reply, user) {
    card.appendChild(el("p", {"class": "meta reply-meta", text: "outcome " + reply.outcome + " · confidence " + fmt(reply.confidence) +
      " · intent " + fmt(reply.intent) + " · adapter " + fmt(reply.adapter) + " · cached " + reply.cached}));
    var sources = el("div", {"class": "sources"});
    card.appendChild(el("h3", {text: t("sources")}));
    card.appendChild(sources);
    api("POST", "/admin/tenants/" + tenant + "/search-test", {question: question}).then(function (found) {
      var by = {};
      found.hits.forEach(function (h) { by[h.doc_id] = by[h.doc_id] || h; });
      sources.appendChild(table(["doc_id", "title", "dense", "sparse", "bm25", "rerank", "fused"], reply.sources.map(function (s) {
        var h = by[s.doc_id] || {};
        return [s.doc_id, s.title, h.dense === undefined ? s.score : h.dense, h.sparse, h.bm25, h.rerank, h.fused];
      })));
    }).catch(fail(sources));
    var status = el("span", {"class": "meta"});
    function rate(helpful) {
      api("POST", "/v1/feedback", {session_id: reply.session_id, user_id: user, reply_id: reply.reply_id, helpful: helpful})
        .then(function () { status.textContent = t("thanks"); status.className = "ok"; }).catch(fail(status));
    }
    card.appendChild(el("p", {}, [el("button", {type: "button", "class": "up", "aria-label": t("helpful"), text: t("helpful"), on: {click: function () { rate(true); }}}),
      " ", el("button", {type: "button", "class": "down", "aria-label": t("unhelpful"), text: t("unhelpful"), on: {click: function () { rate(false); }}}), " ", status]));
  }

  // --- Knowledge: sources and their sync state; the search test ------------------------------
  function knowledge(main) {
    var state = el("section", {}, [el("h2", {text: t("state")})]);
    main.appendChild(state);
    api("GET", "/admin/knowledge/" + tenant).then(function (s) {
      var sources = s.sources || {};
      state.appendChild(el("p", {"class": "meta", text: "generation " + fmt(s.generation)}));
      function when(seconds) { return seconds ? new Date(seconds * 1000).toISOString().replace(".000Z", "Z") : "—"; }
      state.appendChild(table(["source", "documents", "last sync", "last full sync", "rejected (last sync)", "cursor"],
        Object.keys(sources).map(function (name) {
          var v = sources[name] || {};
          return [name, v.documents, when(v.last_success), when(v.last_full_sync), v.rejected, v.cursor];
        })));
    }).catch(fail(state));
    var input = el("input", {type: "text", id: "search-question", size: "60", "aria-label": t("question")});
    var result = el("div", {id: "search-result"});
    main.appendChild(el("section", {}, [el("h2", {text: t("search")}),
      el("form", {on: {submit: function (e) {
        e.preventDefault();
        result.textContent = "";
        api("POST", "/admin/tenants/" + tenant + "/search-test", {question: input.value}).then(function (found) {
          result.appendChild(el("p", {id: "search-decision", text: t("decision") + ": " + found.decision + " (confidence " + fmt(found.confidence) +
            (found.margin === null ? "" : " · margin " + fmt(found.margin)) + ")"}));
          result.appendChild(table(["kept", "doc_id", "title", "fused", "dense", "sparse", "bm25", "rerank"], found.hits.map(function (h) {
            return [h.kept ? "✓" : "", h.doc_id, h.title, h.fused, h.dense, h.sparse, h.bm25, h.rerank];
          })));
        }).catch(fail(result));
      }}}, [input, " ", el("button", {type: "submit", text: t("search")})]), result]));
  }

  // --- Insights: rates, replies per day, unanswered clusters, worst-rated answers -------------
  function insights(main) {
    var box = el("section", {id: "insights"});
    main.appendChild(box);
    api("GET", "/admin/tenants/" + tenant + "/insights?days=30").then(function (data) {
      var r = data.rates;
      box.appendChild(el("h2", {text: t("rates")}));
      box.appendChild(table(["replies", "answer", "fallback", "handover", "satisfaction", "resolution", "rated"],
        [[r.replies, r.answer_rate, r.fallback_rate, r.handover_rate, r.satisfaction, r.resolution_rate, r.rated]]));
      box.appendChild(el("h2", {text: t("daily")}));
      box.appendChild(chart(data.daily));
      box.appendChild(el("h2", {text: t("unanswered")}));
      var draft = el("textarea", {id: "draft", rows: "4", hidden: "hidden", "aria-label": t("draft")});
      box.appendChild(table(["count", "examples", ""], data.unanswered.map(function (c) {
        return [c.count, c.examples.join(" | "), el("button", {type: "button", text: t("draft"), on: {click: function () {
          draft.hidden = false;
          draft.value = JSON.stringify({doc_id: "", title: c.examples[0], text: "", category: "faq"}, null, 2);
          draft.focus();
        }}})];
      })));
      box.appendChild(draft);
      box.appendChild(el("h2", {text: t("worst")}));
      box.appendChild(table(["question", "answer", "unhelpful", ""], data.worst_rated.map(function (w) {
        var fix = el("input", {type: "text", size: "40", "aria-label": t("correct")});
        var status = el("span");
        function review(verdict) {
          api("PUT", "/admin/tenants/" + tenant + "/records/" + w.reply_id + "/review",
            verdict === "corrected" ? {verdict: verdict, answer: fix.value} : {verdict: verdict})
            .then(function () { status.textContent = t("done"); status.className = "ok"; }).catch(fail(status));
        }
        return [w.question, w.answer, w.unhelpful, el("span", {}, [el("button", {type: "button", text: t("approve"), on: {click: function () { review("approved"); }}}),
          " ", fix, " ", el("button", {type: "button", text: t("correct"), on: {click: function () { review("corrected"); }}}), " ", status])];
      })));
    }).catch(fail(box));
  }
  function chart(days) {
    var width = 720, height = 176, axis = 16, bar = Math.min(28, Math.max(4, Math.floor(width / Math.max(days.length, 1)) - 4));
    var top = Math.max.apply(null, days.map(function (d) { return d.replies; }).concat([1]));
    var colours = {answered: "#4a8", tool: "#6ac", fallback: "#e93", handover: "#c44", guardrail: "#999", error: "#333"};
    var ns = "http://www.w3.org/2000/svg", svg = document.createElementNS(ns, "svg");
    svg.setAttribute("width", width); svg.setAttribute("height", height); svg.setAttribute("role", "img");
    svg.setAttribute("aria-label", t("daily"));
    days.forEach(function (d, i) {
      var y = height - axis;
      if (i % Math.ceil(days.length / 12) === 0) {
        var label = document.createElementNS(ns, "text");
        label.setAttribute("x", i * (bar + 4) + 2); label.setAttribute("y", height - 3); label.setAttribute("font-size", "10");
        label.textContent = d.day.slice(5); svg.appendChild(label);
      }
      Object.keys(colours).forEach(function (o) {
        var n = d.by_outcome[o] || 0, h = n / top * (height - axis - 10);
        if (!n) { return; }
        var rect = document.createElementNS(ns, "rect");
        rect.setAttribute("x", i * (bar + 4) + 2); rect.setAttribute("y", y - h); rect.setAttribute("width", bar);
        rect.setAttribute("height", h); rect.setAttribute("fill", colours[o]);
        var title = document.createElementNS(ns, "title"); title.textContent = d.day + " " + o + ": " + n;
        rect.appendChild(title); svg.appendChild(rect); y -= h;
      });
    });
    return el("div", {"class": "chart"}, [svg]);
  }

  // --- Adapters (admin): versions, the tenant's rollout, activate / canary / rollback ---------
  function adapters(main) {
    var box = el("section", {id: "adapters"});
    main.appendChild(box);
    api("GET", "/admin/adapters").then(function (state) {
      var rollout = (state.tenants || {})[tenant];
      box.appendChild(el("p", {id: "rollout", text: rollout ? tenant + ": " + rollout.adapter + "@" + rollout.active +
        (rollout.canary ? " · canary " + rollout.canary.version + " " + rollout.canary.percent + "%" : "") +
        " · history " + (rollout.history.join(", ") || "—") : tenant + ": base model"}));
      var status = el("p", {id: "adapter-status"});
      function act(method, path, body) {
        if (!confirmed()) { return; }
        api(method, path, body).then(function () { status.textContent = t("done"); render(); }).catch(fail(status));
      }
      var rows = [];
      Object.keys(state.adapters || {}).forEach(function (name) {
        Object.keys(state.adapters[name]).forEach(function (version) {
          var v = state.adapters[name][version], e = v.evaluation;
          var evaluated = e ? (e.passed ? "passed" : "failed: " + e.failed.join("; ")) + " · " + (e.evaluated_at || "").slice(0, 16) : "—";
          rows.push([name, version, v.rank, el("span", {"class": "evaluation"}, [evaluated]), el("span", {}, [
            el("button", {type: "button", text: t("activate"), on: {click: function () { act("PUT", "/admin/tenants/" + tenant + "/adapter", {adapter: name, version: version}); }}}),
            " ", el("button", {type: "button", text: t("canary") + " 10%", on: {click: function () { act("PUT", "/admin/tenants/" + tenant + "/adapter/canary", {version: version, percent: 10}); }}})])]);
        });
      });
      box.appendChild(table(["adapter", "version", "rank", "cs-eval", ""], rows));
      box.appendChild(el("p", {}, [
        el("button", {type: "button", id: "rollback", text: t("rollback"), on: {click: function () { act("POST", "/admin/tenants/" + tenant + "/adapter/rollback"); }}}),
        " ", el("button", {type: "button", text: t("promote"), on: {click: function () { act("POST", "/admin/tenants/" + tenant + "/adapter/canary/promote"); }}}),
        " ", el("button", {type: "button", text: t("abort"), on: {click: function () { act("DELETE", "/admin/tenants/" + tenant + "/adapter/canary"); }}})]));
      box.appendChild(status);
    }).catch(fail(box));
  }

  // --- Tenants and keys (admin) ----------------------------------------------------------------
  function tenants(main) {
    var box = el("section", {id: "tenants"});
    main.appendChild(box);
    var status = el("p", {id: "tenant-status"});
    var id = el("input", {type: "text", "aria-label": t("tenant"), placeholder: t("tenant")});
    var persona = el("input", {type: "text", size: "50", "aria-label": t("persona"), placeholder: t("persona")});
    box.appendChild(el("form", {on: {submit: function (e) {
      e.preventDefault();
      api("POST", "/admin/tenants", {tenant: id.value, persona: persona.value}).then(function () { tenant = id.value; render(); }).catch(fail(status));
    }}}, [el("h2", {text: t("create")}), id, " ", persona, " ", el("button", {type: "submit", text: t("create")})]));
    var scope = el("select", {"aria-label": t("scope")}, ["storefront", "operator", "ingest"].map(function (s) { return el("option", {value: s, text: s}); }));
    box.appendChild(el("form", {on: {submit: function (e) {
      e.preventDefault();
      api("POST", "/admin/keys", {scope: scope.value, tenant: tenant}).then(function (k) {
        status.textContent = t("shown_once") + " " + k.key; status.className = "ok"; keys();
      }).catch(fail(status));
    }}}, [el("h2", {text: t("issue") + " (" + tenant + ")"}), scope, " ", el("button", {type: "submit", text: t("issue")})]));
    box.appendChild(status);
    var list = el("div", {id: "keys"});
    box.appendChild(list);
    function keys() {
      list.textContent = "";
      api("GET", "/admin/keys?tenant=" + tenant).then(function (all) {
        list.appendChild(table(["key_id", "scope", "label", "created", "last used", "expires", "revoked", ""], all.map(function (k) {
          return [k.key_id, k.scope, k.label, k.created_at, k.last_used_at, k.expires_at, k.revoked_at, k.revoked_at ? "" : el("span", {}, [
            el("button", {type: "button", text: t("rotate"), on: {click: function () {
              if (!confirmed()) { return; }
              api("POST", "/admin/keys/" + k.key_id + "/rotate", {grace_s: 3600}).then(function (n) {
                status.textContent = t("shown_once") + " " + n.key; status.className = "ok"; keys(); }).catch(fail(status)); }}}),
            " ", el("button", {type: "button", text: t("revoke"), on: {click: function () {
              if (!confirmed()) { return; }
              api("DELETE", "/admin/keys/" + k.key_id).then(keys).catch(fail(status)); }}})])];
        })));
      }).catch(fail(list));
    }
    keys();
  }

  // --- Log in ---------------------------------------------------------------------------------
  function start() {
    api("GET", "/admin/whoami").then(function (me) {
      if (me.scope !== "operator" && me.scope !== "admin") { throw new Error("403: use an operator or the admin key"); }
      who = me;
      tenant = me.tenant;
      sessionStorage.setItem("cs-key", key);
      $("#login").hidden = true;
      $("#logout").hidden = false;
      $("#who").textContent = me.scope + (me.tenant ? " · " + me.tenant : "");
      render();
    }).catch(function (err) { key = null; sessionStorage.removeItem("cs-key"); fail($("#login-error"))(err); });
  }
  $("#login").addEventListener("submit", function (e) { e.preventDefault(); key = $("#key").value; start(); });
  $("#logout").addEventListener("click", function () { sessionStorage.removeItem("cs-key"); location.reload(); });
  $("#lang").addEventListener("click", function () {
    lang = lang === "zh" ? "en" : "zh"; sessionStorage.setItem("cs-lang", lang);
    if (who) { render(); } else { translate(); }
  });
  translate();
  if (key) { start(); }
})();

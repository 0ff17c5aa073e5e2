// The supervisor console: views by the URL fragment (#now, #call/<id>, #history, #record/<name>,
// #personas). Everything shown goes in as text (textContent), never as HTML.
"use strict";
const CSRF = document.querySelector('meta[name="csrf"]').content;
const $ = (s) => document.querySelector(s);
let stream = null;     // the open EventSource (one view at a time)
let me = {transfer_targets: []};

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}
function row(cells) { const tr = el("tr"); cells.forEach((c) => { const td = el("td"); if (c instanceof Node) td.append(c); else td.textContent = c ?? ""; tr.append(td); }); return tr; }
function meter(v) { const m = el("span", "", "meter"); m.style.width = Math.min(100, Math.round((v || 0) * 300)) + "px"; m.title = (v || 0).toFixed(3); return m; }
function secs(s) { s = Math.round(s || 0); return Math.floor(s / 60) + ":" + String(s % 60).padStart(2, "0"); }
async function getJSON(url) {
  const r = await fetch(url, {credentials: "same-origin"});
  if (r.status === 401) { location.href = "/console/login"; throw new Error("signed out"); }
  return r.json();
}
async function post(url, body) {
  const r = await fetch(url, {method: "POST", credentials: "same-origin",
    headers: {"X-CSRF-Token": CSRF, "Content-Type": "application/json"}, body: JSON.stringify(body || {})});
  return {status: r.status, body: await r.json()};
}
let listening = null;   // the listen-in peer connection, while one is open
function closeStream() {
  if (stream) { stream.close(); stream = null; }
  if (listening) { listening.close(); listening = null; $("#listen").textContent = "Listen in"; }
}
function show(id) { document.querySelectorAll(".view").forEach((v) => { v.hidden = v.id !== id; }); }

// -- Now ---------------------------------------------------------------------------------------
function renderNow(snap) {
  const s = snap.slots;
  $("#slots").textContent = `${s.used} of ${s.max} lines busy, ${s.free} free` + (snap.draining ? " (draining)" : "");
  const tb = $("#calls tbody"); tb.replaceChildren();
  snap.calls.forEach((c) => {
    const last = (c.transcript || []).map((t) => `${t.who}: ${t.text || ""}`).join(" ");
    const tr = row([c.call_id, c.persona, c.endpoint, c.direction, c.caller_number, c.dialled_number, secs(c.duration_s), c.state,
      meter(c.level_caller), meter(c.level_agent), c.barge_ins, c.late_inbound, c.playout_underruns, c.reprimes, last]);
    tr.className = "clickable call-row"; tr.dataset.callId = c.call_id;
    tr.onclick = () => { location.hash = "#call/" + encodeURIComponent(c.call_id); };
    tb.append(tr);
  });
  renderQueue(snap.queue);
}
function renderQueue(q) {
  $("#queue-depth").textContent = !q.enabled ? "No queue (queue.max_waiting is 0): busy callers are refused."
    : `${q.depth} waiting of at most ${q.max_waiting}`;
  const tb = $("#queue tbody"); tb.replaceChildren();
  q.waiting.forEach((w) => {
    const tr = row([w.position, secs(w.waited_s), w.persona, w.endpoint, w.caller_number, w.dialled_number]);
    tr.className = "queue-row"; tb.append(tr);
  });
}
function viewNow() {
  show("view-now");
  stream = new EventSource("/console/api/now/stream");
  stream.addEventListener("now", (e) => renderNow(JSON.parse(e.data)));
}

// -- A call ------------------------------------------------------------------------------------
function addSegment(list, seg) {
  list.append(el("li", `[${secs(seg.t0)}] ${seg.who}: ${seg.text ?? ""}`, seg.who));
  list.scrollTop = list.scrollHeight;
}
// Live pieces join the speaker's current line; pieces the first snapshot already held are
// skipped (README "Live calls": a piece numbered n up to the snapshot's transcript_pieces).
let seen = 0;  // the transcript's pieces already shown (the snapshot's transcript_pieces, then each piece's n)
function addPiece(list, p) {
  if (p.n <= seen) return;
  seen = p.n;
  const last = list.lastElementChild;
  if (last && last.className === p.who) last.textContent += p.text;
  else addSegment(list, p);
  list.scrollTop = list.scrollHeight;
}
function addEvent(list, ev) {
  const {type, t, ...rest} = ev;
  list.append(el("li", `[${secs(t)}] ${type} ${JSON.stringify(rest)}`));
}
function fillVars(table, vars) {
  table.replaceChildren(); Object.entries(vars || {}).forEach(([k, v]) => table.append(row([k, v])));
}
async function viewCall(id) {
  show("view-call");
  $("#call-id").textContent = id; $("#action-result").textContent = "";
  const sel = $("#transfer-target"); sel.replaceChildren();
  me.transfer_targets.forEach((t) => sel.append(el("option", t)));
  $("#transfer").disabled = me.transfer_targets.length === 0;
  const d = await getJSON("/console/api/calls/" + encodeURIComponent(id));
  if (d.error) { $("#call-state").textContent = "ended"; $("#call-meta").textContent = "This call is no longer live: see History."; return; }
  $("#call-meta").textContent = `${d.persona} · ${d.endpoint} · ${d.direction} · from ${d.caller_number || "?"} to ${d.dialled_number || "?"} · started ${d.started_at}`;
  $("#prompt").textContent = d.prompt || ""; fillVars($("#variables"), d.variables);
  const tr = $("#transcript"), evs = $("#events"); tr.replaceChildren(); evs.replaceChildren();
  (d.events || []).forEach((e) => addEvent(evs, e));
  stream = new EventSource("/console/api/calls/" + encodeURIComponent(id) + "/events");
  stream.addEventListener("call", (e) => {
    tr.replaceChildren();
    const c = JSON.parse(e.data); $("#call-state").textContent = c.state;
    (c.transcript || []).forEach((s) => addSegment(tr, s));
    seen = c.transcript_pieces || 0;
  });
  stream.addEventListener("transcript", (e) => addPiece(tr, JSON.parse(e.data)));
  stream.addEventListener("state", (e) => { $("#call-state").textContent = JSON.parse(e.data).state; });
  for (const type of ["barge_in", "dtmf", "hold", "transfer", "transfer_failed", "reprime"]) {
    stream.addEventListener(type, (e) => addEvent(evs, JSON.parse(e.data)));
  }
  stream.addEventListener("end", (e) => { const b = JSON.parse(e.data); addEvent(evs, b); $("#call-state").textContent = "ended: " + b.reason; closeStream(); });
}
$("#hangup").onclick = async () => {
  const id = $("#call-id").textContent;
  if (!confirm(`Hang up call ${id}?`)) return;
  const r = await post("/console/api/calls/" + encodeURIComponent(id) + "/hangup");
  $("#action-result").textContent = r.status === 200 ? "Hung up." : (r.body.reason || "failed");
};
$("#transfer").onclick = async () => {
  const id = $("#call-id").textContent, target = $("#transfer-target").value;
  if (!confirm(`Transfer call ${id} to ${target}?`)) return;
  const r = await post("/console/api/calls/" + encodeURIComponent(id) + "/transfer", {target});
  $("#action-result").textContent = r.status === 202 ? "Transfer to " + target + " requested." : (r.body.reason || "failed");
};

// Listen in: receive-only WebRTC (the page offers to receive audio and sends none). The loudness
// the page hears is kept in window.__listen (what the browser tests read).
window.__listen = {state: "off", loudFrames: 0, frames: 0};
$("#listen").onclick = async () => {
  if (listening) { closeStream(); return; }
  const id = $("#call-id").textContent;
  const pc = new RTCPeerConnection(); listening = pc;
  pc.addTransceiver("audio", {direction: "recvonly"});
  pc.ontrack = (e) => {
    const audio = $("#listen-audio"); audio.srcObject = e.streams[0] || new MediaStream([e.track]); audio.play().catch(() => {});
    const ctx = new AudioContext(); const an = ctx.createAnalyser(); an.fftSize = 2048;
    ctx.createMediaStreamSource(audio.srcObject).connect(an);
    const buf = new Float32Array(an.fftSize);
    const tick = () => {
      if (listening !== pc) { ctx.close(); return; }
      an.getFloatTimeDomainData(buf);
      let peak = 0; for (const v of buf) peak = Math.max(peak, Math.abs(v));
      window.__listen.frames++; if (peak > 0.01) window.__listen.loudFrames++;
      setTimeout(tick, 50);
    };
    tick();
  };
  pc.onconnectionstatechange = () => { window.__listen.state = pc.connectionState; };
  await pc.setLocalDescription(await pc.createOffer());
  await new Promise((ok) => { if (pc.iceGatheringState === "complete") ok(); else pc.onicegatheringstatechange = () => { if (pc.iceGatheringState === "complete") ok(); }; setTimeout(ok, 2000); });
  const r = await post("/console/api/calls/" + encodeURIComponent(id) + "/listen", {sdp: pc.localDescription.sdp, type: "offer"});
  if (r.status !== 200) { $("#action-result").textContent = r.body.reason || "cannot listen"; closeStream(); return; }
  await pc.setRemoteDescription(r.body);
  $("#listen").textContent = "Stop listening";
};

// -- History -----------------------------------------------------------------------------------
async function viewHistory() {
  show("view-history");
  const q = new URLSearchParams({persona: $("#q-persona").value, number: $("#q-number").value,
    date: $("#q-date").value, reason: $("#q-reason").value});
  const d = await getJSON("/console/api/history?" + q);
  const tb = $("#records tbody"); tb.replaceChildren();
  d.records.forEach((r) => {
    const outcome = r.reason + (r.transfer ? ` (transfer ${r.transfer.outcome})` : "");
    const tr = row([r.started_at, r.persona, r.endpoint, r.direction ?? "", r.caller_number, r.dialled_number, secs(r.duration_s), outcome]);
    tr.className = "clickable record-row"; tr.dataset.callId = r.call_id;
    tr.onclick = () => { location.hash = "#record/" + encodeURIComponent(r.name); };
    tb.append(tr);
  });
}
$("#search").onsubmit = (e) => { e.preventDefault(); viewHistory(); };
async function viewRecord(name) {
  show("view-record");
  const d = await getJSON("/console/api/history/" + encodeURIComponent(name));
  $("#record-id").textContent = d.call_id;
  $("#record-meta").textContent = `${d.persona} · ${d.endpoint} · ${d.direction ?? ""} · from ${d.caller_number || "?"} to ${d.dialled_number || "?"} · ${d.started_at} · ${secs(d.duration_s)} · ended: ${d.reason}` + (d.transfer ? ` · transfer to ${d.transfer.target}: ${d.transfer.outcome}` : "");
  $("#record-audio").src = "/console/api/history/" + encodeURIComponent(name) + "/audio";
  const tr = $("#record-transcript"); tr.replaceChildren(); (d.transcript || []).forEach((s) => addSegment(tr, s));
  $("#record-prompt").textContent = d.prompt || ""; fillVars($("#record-variables"), d.variables);
  const evs = $("#record-events"); evs.replaceChildren(); (d.events || []).forEach((e) => addEvent(evs, e));
}

// -- Personas ----------------------------------------------------------------------------------
async function viewPersonas() {
  show("view-personas");
  const d = await getJSON("/console/api/personas");
  const tb = $("#personas tbody"); tb.replaceChildren();
  d.personas.forEach((p) => tb.append(row([p.id + (p.default ? " (default)" : ""), p.direction, p.numbers.join(", "), p.company, p.agent_name, p.source])));
  const ul = $("#problems"); ul.replaceChildren();
  if (!d.problems.length) ul.append(el("li", "none"));
  d.problems.forEach((p) => ul.append(el("li", p)));
}

$("#logout").onclick = async () => { await post("/console/api/logout"); location.href = "/console/login"; };
function route() {
  closeStream();
  const h = decodeURIComponent(location.hash.slice(1));
  if (h.startsWith("call/")) return viewCall(h.slice(5));
  if (h.startsWith("record/")) return viewRecord(h.slice(7));
  if (h === "history") return viewHistory();
  if (h === "personas") return viewPersonas();
  return viewNow();
}
window.addEventListener("hashchange", route);
getJSON("/console/api/me").then((m) => { me = m; route(); });

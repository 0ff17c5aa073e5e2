// The call page: pick a persona, call over WebRTC, show the agent's words and audio levels.
// Plain ES module, no build step. window.__call exposes counters for automated tests.

const $ = (id) => document.getElementById(id);
const stats = { agentPeak: 0, agentLoudFrames: 0, texts: 0, events: [], state: "idle", position: 0 };
window.__call = stats;

let pc = null, channel = null, mic = null, timer = null, started = 0, meterTimer = null, statsTimer = null;
let audioCtx = null;

function status(text, error = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", error);
}

async function loadPersonas() {
  try {
    const res = await fetch("/api/personas");
    const { personas } = await res.json();
    for (const p of personas) {
      const opt = document.createElement("option");
      opt.value = p.id;
      opt.textContent = p.company ? `${p.company} (${p.agent_name})` : p.id;
      $("persona").append(opt);
    }
  } catch (e) {
    status("Cannot reach the agent server.", true);
  }
}

function level(analyser, buf) {
  analyser.getFloatTimeDomainData(buf);
  let sum = 0;
  for (const v of buf) sum += v * v;
  return Math.sqrt(sum / buf.length);
}

function startMeters(localStream) {
  const inA = audioCtx.createAnalyser();
  audioCtx.createMediaStreamSource(localStream).connect(inA);
  const inBuf = new Float32Array(inA.fftSize);
  meterTimer = setInterval(() => { $("in-level").value = Math.min(1, level(inA, inBuf) * 4); }, 50);
  statsTimer = setInterval(agentLevel, 200);
}

// The agent's level comes from the receiver's own statistics (the decoded audio level), not from
// Web Audio: it needs no running AudioContext, which browsers without an output device (and
// Firefox before a user gesture) never start.
async function agentLevel() {
  if (!pc) return;
  const report = await pc.getStats();
  report.forEach((s) => {
    if (s.type !== "inbound-rtp" || s.kind !== "audio" || typeof s.audioLevel !== "number") return;
    $("out-level").value = Math.min(1, s.audioLevel * 4);
    stats.agentPeak = Math.max(stats.agentPeak, s.audioLevel);
    if (s.audioLevel > 0.003) stats.agentLoudFrames += 1;
  });
}

function tick() {
  const s = Math.floor((Date.now() - started) / 1000);
  $("timer").textContent = `${String(Math.floor(s / 60)).padStart(2, "0")}:${String(s % 60).padStart(2, "0")}`;
}

function onEvent(msg) {
  stats.events.push(msg.type);
  if (msg.type === "text") {
    stats.texts += 1;
    $("transcript").append(document.createTextNode(msg.text));
    $("transcript").scrollTop = $("transcript").scrollHeight;
  } else if (msg.type === "barge_in") {
    const span = document.createElement("span");
    span.className = "barge";
    span.textContent = " [you interrupted] ";
    $("transcript").append(span);
  } else if (msg.type === "queue") {
    queued(msg.position);
  } else if (msg.type === "refused") {
    // waited in the queue and no slot came (or the agent is shutting down): the last message
    stats.state = msg.error;
    status(msg.error === "busy" ? `All agents are still busy. Try again in ${msg.retry_after || 5} s.`
      : `The agent cannot take calls now (${msg.reason}). Try again in ${msg.retry_after || 5} s.`, true);
    cleanup();
  } else if (msg.type === "state") {
    stats.state = msg.state;
    if (msg.state === "answering") status("Connecting to the agent…");
    if (msg.state === "live") status("In call.");
  } else if (msg.type === "ended") {
    status(`Call ended (${msg.reason.replaceAll("_", " ")}).`);
    cleanup();
  }
}

// Every agent busy: the call waits in the queue (hold audio plays) until a slot comes.
function queued(position) {
  stats.state = "queued";
  stats.position = position;
  status(`All agents are busy, you are number ${position}. Please hold.`);
}

async function call(playground = null) {
  $("call").disabled = true;
  $("pg-call").disabled = true;
  // Made here, inside the click, while the page has the user's gesture: browsers (Firefox
  // especially) keep an AudioContext made later, after the awaits below, suspended and silent.
  audioCtx = audioCtx || new AudioContext();
  audioCtx.resume();
  $("transcript").textContent = "";
  status("Asking for the microphone…");
  try {
    mic = await navigator.mediaDevices.getUserMedia({ audio: { echoCancellation: true, noiseSuppression: true } });
  } catch (e) {
    status(e.name === "NotAllowedError" ? "Microphone blocked: allow microphone access for this page and try again."
                                        : `No microphone available (${e.name}).`, true);
    $("call").disabled = false;
    return;
  }
  pc = new RTCPeerConnection();
  for (const t of mic.getAudioTracks()) pc.addTrack(t, mic);
  channel = pc.createDataChannel("events");
  channel.onmessage = (ev) => onEvent(JSON.parse(ev.data));
  pc.ontrack = (ev) => { $("remote").srcObject = ev.streams[0] || new MediaStream([ev.track]); };
  pc.onconnectionstatechange = () => {
    if (!pc) return;
    if (pc.connectionState === "failed" || pc.connectionState === "disconnected") {
      status("Connection lost.", true);
      cleanup();
    }
  };
  await pc.setLocalDescription(await pc.createOffer());
  await new Promise((resolve) => {
    if (pc.iceGatheringState === "complete") return resolve();
    pc.onicegatheringstatechange = () => pc.iceGatheringState === "complete" && resolve();
    setTimeout(resolve, 3000);
  });
  status("Calling…");
  let res;
  try {
    const offer = { sdp: pc.localDescription.sdp, type: pc.localDescription.type };
    const token = callToken();
    if (playground) offer.playground = playground;
    else if (token) offer.token = token;  // the token says which line: the site decided
    else offer.persona = $("persona").value;
    res = await fetch("/api/call", {
      method: "POST", headers: { "Content-Type": "application/json", ...playgroundAuth() }, body: JSON.stringify(offer),
    });
  } catch (e) {
    status("Connection lost: the agent server cannot be reached.", true);
    cleanup();
    return;
  }
  const body = await res.json();
  if (!res.ok) {
    const msg = res.status === 503 ? `Server busy: ${body.reason}. Try again in ${body.retry_after || 5} s.`
      : res.status === 401 ? `Cannot call: ${body.message || body.reason}.`
      : res.status === 429 ? `Too many calls from here: ${body.reason}. Try again in ${body.retry_after || 60} s.`
      : `Call refused: ${body.reason}`;
    status(msg, true);
    showProblems(body.problems || []);
    stats.state = body.error;
    cleanup();
    return;
  }
  await pc.setRemoteDescription({ sdp: body.sdp, type: body.type });
  stats.state = "connected";
  if (body.queued && stats.position === 0) queued(body.position);
  started = Date.now();
  timer = setInterval(tick, 250);
  startMeters(mic);
  $("hangup").disabled = false;
}

function cleanup() {
  clearInterval(timer);
  clearInterval(meterTimer);
  clearInterval(statsTimer);
  if (pc) pc.close();
  if (mic) mic.getTracks().forEach((t) => t.stop());
  pc = null; channel = null; mic = null;
  stats.position = 0;
  $("hangup").disabled = true;
  $("call").disabled = false;
  $("pg-call").disabled = false;
}

function hangup() {
  if (channel && channel.readyState === "open") channel.send(JSON.stringify({ type: "hangup" }));
  status("Call ended.");
  stats.state = "hung_up";
  setTimeout(cleanup, 200);
}

// -- signed call tokens: from the embedding site (window.personaplexToken) or the URL (#token=...) --
function callToken() {
  if (window.personaplexToken) return String(window.personaplexToken);
  const m = location.hash.match(/(?:^#|&)token=([^&]+)/);
  return m ? decodeURIComponent(m[1]) : null;
}

// -- the prompt playground (shown when the server has it on) --------------------------------------
// Which kinds and fields a persona has is the server's to say (GET /api/playground): set there.
let LIST_FIELDS = [];
let KIND_FIELDS = {};
const SLIDERS = ["temp_audio", "temp_text", "topk_audio", "topk_text"];

function playgroundAuth() {
  const token = $("pg-token").value.trim();
  return token ? { Authorization: `Bearer ${token}` } : {};
}

function showProblems(problems) {
  $("pg-problems").replaceChildren(...problems.map((p) => {
    const li = document.createElement("li");
    li.textContent = p.replace(/^<playground>:\s*/, "");
    return li;
  }));
}

// The form as persona fields (what a persona file would say).
function playgroundSpec() {
  const kind = $("pg-kind").value;
  const spec = { kind, voice: $("pg-voice").value };
  for (const f of KIND_FIELDS[kind]) {
    const raw = $(`pg-${f}`).value;
    if (LIST_FIELDS.includes(f)) {
      const lines = raw.split("\n").map((x) => x.trim()).filter(Boolean);
      if (lines.length) spec[f] = lines;
    } else if (raw.trim()) spec[f] = raw.trim();
  }
  spec.sampling = {};
  for (const k of SLIDERS) {
    const v = Number($(`pg-${k}`).value);
    spec.sampling[k] = k.startsWith("topk") ? Math.round(v) : v;
  }
  return spec;
}

function showKind() {
  for (const fs of document.querySelectorAll("#pg-form fieldset[data-kind]")) fs.hidden = fs.dataset.kind !== $("pg-kind").value;
}

async function savePersona() {
  const numbers = $("pg-numbers").value.split(",").map((x) => x.trim()).filter(Boolean);
  const res = await fetch("/api/playground/yaml", {
    method: "POST", headers: { "Content-Type": "application/json", ...playgroundAuth() },
    body: JSON.stringify({ persona: playgroundSpec(), id: $("pg-id").value.trim(), numbers }),
  });
  if (!res.ok) {
    const body = await res.json();
    showProblems(body.problems || [body.reason]);
    return;
  }
  showProblems([]);
  const url = URL.createObjectURL(new Blob([await res.text()], { type: "application/x-yaml" }));
  const a = document.createElement("a");
  a.href = url;
  a.download = `${$("pg-id").value.trim() || "my-persona"}.yaml`;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
  status(`Saved ${a.download}: put it in the personas folder (and run personas check).`);
}

// The kind menu and each kind's inputs from the server's list: the page's own markup gives the
// known fields their labels and hints; a field it lacks gets a plain input named after it.
function buildKinds(info) {
  KIND_FIELDS = info.fields;
  LIST_FIELDS = info.list_fields || [];
  const select = $("pg-kind");
  const labels = Object.fromEntries([...select.options].map((o) => [o.value, o.textContent]));
  select.replaceChildren(...info.kinds.map((kind) => {
    const opt = document.createElement("option");
    opt.value = kind;
    opt.textContent = labels[kind] || kind;
    return opt;
  }));
  const sets = Object.fromEntries([...document.querySelectorAll("#pg-form fieldset[data-kind]")]
    .map((fs) => [fs.dataset.kind, fs]));
  for (const [kind, fs] of Object.entries(sets)) if (!info.kinds.includes(kind)) fs.remove();
  let last = sets[info.kinds.find((k) => sets[k])] || null;
  for (const kind of info.kinds) {
    let fs = sets[kind];
    if (!fs) {
      fs = document.createElement("fieldset");
      fs.dataset.kind = kind;
      (last ? last.after(fs) : $("pg-form").prepend(fs));
    }
    last = fs;
    for (const f of KIND_FIELDS[kind]) {
      if ($(`pg-${f}`)) continue;
      const label = document.createElement("label");
      const input = document.createElement(LIST_FIELDS.includes(f) ? "textarea" : "input");
      input.id = `pg-${f}`;
      label.append(`${f.replaceAll("_", " ")} `, input);
      fs.append(label);
    }
  }
}

async function loadPlayground() {
  let res = await fetch("/api/playground");
  if (res.status === 404) return;  // off on this server
  $("playground").hidden = false;
  if (res.status === 401 || res.status === 403) {
    $("pg-token-row").hidden = false;
    $("pg-token").addEventListener("change", loadPlayground, { once: true });
    if (res.status === 403) showProblems([(await res.json()).reason]);
    return;
  }
  const info = await res.json();
  buildKinds(info);
  $("pg-voice").replaceChildren(...info.voices.map((v) => {
    const opt = document.createElement("option");
    opt.value = opt.textContent = v;
    return opt;
  }));
  for (const k of SLIDERS) {
    const input = $(`pg-${k}`);
    const out = document.querySelector(`output[for="pg-${k}"]`);
    input.value = info.sampling[k];
    out.textContent = input.value;
    input.addEventListener("input", () => { out.textContent = input.value; });
  }
  showKind();
}

$("call").addEventListener("click", () => call());
$("hangup").addEventListener("click", hangup);
$("pg-kind").addEventListener("change", showKind);
$("pg-call").addEventListener("click", () => { showProblems([]); call(playgroundSpec()); });
$("pg-save").addEventListener("click", savePersona);
loadPersonas();
loadPlayground();

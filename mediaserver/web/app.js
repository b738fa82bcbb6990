// Chorus web client: joins a room over WebRTC the way WHIP does (one POST with the SDP offer),
// shows who is speaking, and mutes. No framework: this file is the whole client.
// At /t it is the other end of "Move to another device": it takes a session over with the code of
// the link's fragment (from the QR code the old device shows) instead of joining with a token.
"use strict";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
if (params.get("room")) $("room").value = params.get("room");
if (params.get("token")) $("token").value = params.get("token");

// The transfer code travels in the fragment only (it never reaches a server's access log); it is a
// credential, so it leaves the address bar, the history and any bookmark at once.
const transferMode = location.pathname === "/t";
let transferCode = null;
if (transferMode) {
  const raw = location.hash.slice(1);
  try {
    transferCode = decodeURIComponent(raw);
  } catch {
    transferCode = raw;
  }
  history.replaceState(null, "", location.pathname + location.search);
}

let pc = null;
let local = null;
let leaveUrl = null;
let pollTimer = null;
let audioCtx = null;
let remoteAnalyser = null;
// Where this page is a participant once joined: {room, id, token}. The token is the one typed in,
// or, after taking a session over, the fresh one the server gave this device.
let session = null;
let sessionEvents = null;

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

function authHeaders() {
  return { Authorization: "Bearer " + (session ? session.token : $("token").value.trim()) };
}

function participantPath(s) {
  return "/v1/rooms/" + encodeURIComponent(s.room) + "/participants/" + encodeURIComponent(s.id);
}

// Gather every candidate before sending the offer: the server answers in one round trip.
function gatheringComplete(conn) {
  if (conn.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const check = () => {
      if (conn.iceGatheringState === "complete") {
        conn.removeEventListener("icegatheringstatechange", check);
        resolve();
      }
    };
    conn.addEventListener("icegatheringstatechange", check);
    setTimeout(resolve, 2000); // host candidates arrive at once; don't wait on unreachable STUN
  });
}

async function join() {
  const room = $("room").value.trim();
  const token = $("token").value.trim();
  await connect({
    failure: "Could not join: ",
    send: (offer) =>
      fetch("/v1/rooms/" + encodeURIComponent(room) + "/participants", {
        method: "POST",
        headers: { Authorization: "Bearer " + token, "Content-Type": "application/sdp" },
        body: offer,
      }),
    sessionOf: () => ({ room, token }),
  });
}

// The /t page: the same offer as a join, sent with the transfer code; the answer carries the room,
// the participant (the same one the old device was) and a fresh join token for this device.
async function takeOver(code) {
  await connect({
    progress: "Taking over a session from another device…",
    failure: "Could not take over the session: ",
    send: (offer) =>
      fetch("/v1/transfer", {
        method: "POST",
        headers: { Authorization: "Transfer " + code, "Content-Type": "application/sdp" },
        body: offer,
      }),
    sessionOf: (res) => ({ room: res.headers.get("Chorus-Room"), token: res.headers.get("Chorus-Join-Token") }),
  });
}

// Microphone, offer, one POST (`send`), answer: joining and taking over differ only in the POST.
async function connect({ progress, failure, send, sessionOf }) {
  $("join").disabled = true;
  try {
    // ?listen=1 joins to listen only: no microphone, a receive-only offer, which the server
    // carries on its lighter listener path.
    const listenOnly = params.get("listen") === "1";
    if (!listenOnly) {
      setStatus(progress || "Asking for the microphone…");
      // ?raw=1 turns voice processing off (music, or test tones that noise suppression would eat).
      const raw = params.get("raw") === "1";
      local = await navigator.mediaDevices.getUserMedia({
        audio: { echoCancellation: !raw, noiseSuppression: !raw, autoGainControl: !raw },
      });
    }
    audioCtx = new AudioContext();
    if (local) meterFor(local, $("micLevel"));

    const conn = new RTCPeerConnection();
    pc = conn;
    if (local) {
      conn.addTransceiver(local.getAudioTracks()[0], { direction: "sendrecv", streams: [local] });
    } else {
      conn.addTransceiver("audio", { direction: "recvonly" });
    }
    conn.ontrack = (ev) => {
      const stream = ev.streams[0] || new MediaStream([ev.track]);
      $("remote").srcObject = stream; // Chrome only feeds WebAudio from a stream that also plays
      remoteAnalyser = audioCtx.createAnalyser();
      remoteAnalyser.fftSize = 8192;
      audioCtx.createMediaStreamSource(stream).connect(remoteAnalyser);
    };
    // Only the current connection speaks: an old one closing late must not overwrite the status.
    conn.onconnectionstatechange = () => {
      if (conn !== pc || !session) return;
      if (conn.connectionState === "connected") setStatus("Connected to room " + session.room + ".");
      if (conn.connectionState === "failed") setStatus("Connection failed.", true);
    };
    await conn.setLocalDescription(await conn.createOffer());
    setStatus(progress || "Connecting…");
    await gatheringComplete(conn);

    const res = await send(conn.localDescription.sdp);
    if (res.status !== 201) {
      const body = await res.json().catch(() => ({ error: res.statusText }));
      throw new Error(body.error || ("HTTP " + res.status));
    }
    const { room, token } = sessionOf(res);
    const id = res.headers.get("Chorus-Participant-Id");
    if (!room || !token || !id) throw new Error("the server's answer lacks the room, participant or token");
    session = { room, id, token };
    leaveUrl = res.headers.get("Location");
    window.chorusParticipantId = id;
    await conn.setRemoteDescription({ type: "answer", sdp: await res.text() });
    $("leave").disabled = false;
    $("mute").disabled = false;
    $("callPhone").disabled = false;
    $("moveDevice").disabled = false;
    pollTimer = setInterval(poll, 500);
    followSession(session);
  } catch (e) {
    setStatus(failure + e.message, true);
    cleanup();
  }
}

async function leave() {
  const url = leaveUrl;
  const headers = authHeaders();
  if (sessionEvents) sessionEvents.abort(); // our own leave is no news
  if (url) {
    await fetch(url, { method: "DELETE", headers }).catch(() => {});
  }
  cleanup();
  setStatus("Left the room.");
}

function cleanup() {
  clearInterval(pollTimer);
  if (pc) pc.close();
  if (local) local.getTracks().forEach((t) => t.stop());
  pc = null; local = null; leaveUrl = null; session = null;
  $("join").disabled = false;
  $("leave").disabled = true;
  $("mute").disabled = true;
  $("mute").textContent = "Mute";
  $("callPhone").disabled = true;
  $("hangUpPhone").disabled = true;
  $("moveDevice").disabled = true;
  closeMovePanel();
  if (phoneEvents) phoneEvents.abort();
  if (sessionEvents) sessionEvents.abort();
  sessionEvents = null;
}

function toggleMute() {
  const track = local && local.getAudioTracks()[0];
  if (!track) return;
  // A disabled track sends silence, which the server ranks last and does not decode.
  track.enabled = !track.enabled;
  $("mute").textContent = track.enabled ? "Mute" : "Unmute";
}

async function poll() {
  if (!session) return;
  const res = await fetch("/v1/rooms/" + encodeURIComponent(session.room), { headers: authHeaders() }).catch(() => null);
  if (!res || !res.ok || !session) return;
  const info = await res.json();
  const list = $("participants");
  list.replaceChildren();
  for (const p of info.participants) {
    const li = document.createElement("li");
    li.className = p.speaking ? "speaking" : "";
    const name = document.createElement("span");
    name.textContent = p.identity + (String(p.id) === window.chorusParticipantId ? " (you)" : "");
    const state = document.createElement("span");
    state.textContent = p.speaking ? "speaking" : "";
    li.append(name, state);
    list.append(li);
  }
  // Speakers on other servers of the conference, named by the mesh's global list.
  for (const r of info.remote_speakers || []) {
    const li = document.createElement("li");
    li.className = r.speaking ? "speaking remote" : "remote";
    const name = document.createElement("span");
    name.textContent = (r.identity || "someone") + " (another region)";
    const state = document.createElement("span");
    state.textContent = r.speaking ? "speaking" : "";
    li.append(name, state);
    list.append(li);
  }
}

// "Call my phone": the server calls the given phone through the PBX; the phone joins the room
// once answered, and this page's microphone is muted by the server meanwhile (audio: replace).
let phoneCallUrl = null;
let phoneEvents = null;
const PHONE_STATES = {
  dialing: "Calling your phone…",
  ringing: "Your phone is ringing.",
  active: "Your phone is in the call.",
};
const END_REASONS = {
  completed: "the phone hung up",
  hangup: "hung up",
  cancelled: "cancelled",
  no_answer: "no answer",
  busy: "the line is busy",
  declined: "declined",
  not_registered: "that phone is not registered",
  unreachable: "the phone cannot be reached",
  auth_failed: "the phone system refused our credentials",
  codec_mismatch: "no common audio codec",
  media_timeout: "no audio from the phone",
  rejected: "the phone system refused the call",
  failed: "failed",
};

function showPhoneState(t) {
  const el = $("phoneState");
  window.chorusPhoneState = t.state;
  if (t.state === "ended") {
    const why = END_REASONS[t.endReason] || t.endReason || "ended";
    const normal = t.endReason === "completed" || t.endReason === "hangup" || t.endReason === "cancelled";
    // The SIP status helps whoever has to find out why a call failed; a normal end needs none.
    el.textContent = "Phone call ended: " + why + (!normal && t.sipStatus ? " (SIP " + t.sipStatus + ")" : "") + ".";
    el.className = normal ? "" : "error";
    $("callPhone").disabled = !pc;
    $("hangUpPhone").disabled = true;
    phoneCallUrl = null;
  } else {
    el.textContent = PHONE_STATES[t.state] || t.state;
    el.className = "";
    $("hangUpPhone").disabled = false;
  }
}

// Server-sent events with the bearer token: EventSource cannot send headers, so read the stream.
// Yields {event, data} per event; keep-alive comments yield nothing.
async function* serverEvents(res) {
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += value.replace(/\r/g, "");
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const lines = buf.slice(0, cut).split("\n");
      buf = buf.slice(cut + 2);
      const field = (name) => lines.filter((l) => l.startsWith(name + ":")).map((l) => l.slice(name.length + 1).replace(/^ /, ""));
      const event = field("event").pop() || "message";
      const data = field("data").join("\n");
      if (data || field("event").length) yield { event, data };
    }
  }
}

async function followPhone(url) {
  phoneEvents = new AbortController();
  try {
    const res = await fetch(url + "/events", { headers: authHeaders(), signal: phoneEvents.signal });
    for await (const ev of serverEvents(res)) {
      if (ev.data) showPhoneState(JSON.parse(ev.data));
    }
  } catch (e) {
    if (e.name !== "AbortError") setStatus("Lost the phone call's events: " + e.message, true);
  }
}

async function callPhone() {
  const to = $("phoneTo").value.trim();
  if (!to) { $("phoneState").textContent = "Enter your phone's number or extension."; return; }
  if (!session) return;
  $("callPhone").disabled = true;
  const res = await fetch("/v1/rooms/" + encodeURIComponent(session.room) + "/calls", {
    method: "POST",
    headers: { ...authHeaders(), "Content-Type": "application/json" },
    body: JSON.stringify({ to, participantId: Number(window.chorusParticipantId) }),
  }).catch((e) => ({ status: 0, json: async () => ({ error: e.message }) }));
  if (res.status !== 202) {
    const body = await res.json().catch(() => ({}));
    $("phoneState").textContent = "Could not call: " + (body.error || ("HTTP " + res.status));
    $("phoneState").className = "error";
    $("callPhone").disabled = false;
    return;
  }
  phoneCallUrl = res.headers.get("Location");
  showPhoneState(await res.json());
  followPhone(phoneCallUrl);
}

async function hangUpPhone() {
  if (phoneCallUrl) await fetch(phoneCallUrl, { method: "DELETE", headers: authHeaders() }).catch(() => {});
}

// This participant's own events, followed from joining on: `transferred` when another device took
// the session over (the server closes this device's connection just after), `left` when the
// server no longer has the participant. A dropped stream is opened again while still joined.
async function followSession(s) {
  const ctl = new AbortController();
  sessionEvents = ctl;
  while (session === s && !ctl.signal.aborted) {
    try {
      const res = await fetch(participantPath(s) + "/events", { headers: { Authorization: "Bearer " + s.token }, signal: ctl.signal });
      // Refused or unknown: not followable (the roster still shows the room). Anything else
      // (a proxy's 502, a restart) is tried again below.
      if ([401, 403, 404].includes(res.status)) return;
      if (!res.ok) throw new Error("HTTP " + res.status);
      for await (const ev of serverEvents(res)) {
        if (session !== s) return;
        if (ev.event === "transferred") {
          movedAway();
          return;
        }
        if (ev.event === "left") {
          cleanup();
          setStatus("You are no longer in the room.", true);
          return;
        }
      }
    } catch (e) {
      if (e.name === "AbortError") return;
    }
    await new Promise((r) => setTimeout(r, 2000));
  }
}

// Another device has this session now: hang up here, without a leave (the participant lives on
// there; the server would refuse this device's leave anyway).
function movedAway() {
  cleanup();
  setStatus("Moved to another device.");
}

// "Move to another device": a one-time code for this participant, shown as a QR code for the
// other device's camera, with the seconds it has left. A new code replaces the old one.
let moveTimer = null;
let moveRequest = 0;

function moveState(text, isError) {
  $("moveState").textContent = text;
  $("moveState").className = isError ? "error" : "";
}

async function requestMoveCode() {
  const s = session;
  if (!s) return;
  const request = ++moveRequest;
  clearInterval(moveTimer);
  $("qr").replaceChildren();
  $("movePanel").hidden = false;
  $("newCode").disabled = true;
  moveState("Getting a code…");
  try {
    const res = await fetch(participantPath(s) + "/transfers", { method: "POST", headers: { Authorization: "Bearer " + s.token } });
    const body = await res.json().catch(() => ({}));
    if (res.status !== 201) throw new Error(body.error || ("HTTP " + res.status));
    if (request !== moveRequest || session !== s) return; // closed, left or asked again meanwhile
    $("qr").innerHTML = body.qrSvg; // our server's own SVG rendering of the link
    countDown(Number(body.expiresInSeconds) || 0);
  } catch (e) {
    if (request !== moveRequest || session !== s) return;
    moveState("Could not get a code: " + e.message, true);
  } finally {
    if (request === moveRequest) $("newCode").disabled = !session;
  }
}

function countDown(seconds) {
  clearInterval(moveTimer);
  const deadline = performance.now() + seconds * 1000; // this clock, not the server's
  const tick = () => {
    const left = Math.max(0, Math.ceil((deadline - performance.now()) / 1000));
    if (left > 0) {
      moveState("The code expires in " + left + (left === 1 ? " second." : " seconds."));
      return;
    }
    clearInterval(moveTimer);
    moveTimer = null;
    $("qr").replaceChildren(); // nothing left to scan that cannot work
    moveState("The code expired. Press “New code” for another.", true);
  };
  tick();
  moveTimer = setInterval(tick, 250);
}

function closeMovePanel() {
  moveRequest++;
  clearInterval(moveTimer);
  moveTimer = null;
  $("qr").replaceChildren();
  moveState("");
  $("movePanel").hidden = true;
}

function meterFor(stream, meter) {
  const analyser = audioCtx.createAnalyser();
  analyser.fftSize = 1024;
  audioCtx.createMediaStreamSource(stream).connect(analyser);
  const data = new Float32Array(analyser.fftSize);
  const draw = () => {
    analyser.getFloatTimeDomainData(data);
    let sum = 0;
    for (const v of data) sum += v * v;
    meter.value = Math.min(1, Math.sqrt(sum / data.length) * 4);
    requestAnimationFrame(draw);
  };
  draw();
}

// For tests and diagnostics: the level, in dB, of what this page hears at each frequency.
window.chorusMeasure = (freqs) => {
  if (!remoteAnalyser) return null;
  const bins = new Float32Array(remoteAnalyser.frequencyBinCount);
  remoteAnalyser.getFloatFrequencyData(bins);
  const hzPerBin = audioCtx.sampleRate / remoteAnalyser.fftSize;
  return freqs.map((f) => {
    const i = Math.round(f / hzPerBin);
    return Math.max(bins[i - 1] ?? -200, bins[i], bins[i + 1] ?? -200);
  });
};
window.chorusState = () => (pc ? pc.connectionState : "none");
// What the browser's own WebRTC stack counted on the received audio and the pair it uses: tests
// print it, so a silence can be told apart from missing packets or a switched path.
window.chorusReceiveStats = async () => {
  if (!pc) return null;
  const answer = (pc.remoteDescription && pc.remoteDescription.sdp) || "";
  const direction = ["sendrecv", "sendonly", "recvonly", "inactive"].find((d) => answer.includes("a=" + d + "\r\n"));
  const out = { pairs: [], answerDirection: direction || null };
  (await pc.getStats()).forEach((r) => {
    if (r.type === "inbound-rtp" && r.kind === "audio") {
      out.inbound = {
        packetsReceived: r.packetsReceived,
        packetsLost: r.packetsLost,
        concealedSamples: r.concealedSamples,
        totalSamplesReceived: r.totalSamplesReceived,
        jitterBufferDelay: r.jitterBufferDelay,
        jitterBufferEmittedCount: r.jitterBufferEmittedCount,
      };
    }
    if (r.type === "candidate-pair" && (r.nominated || r.state === "succeeded")) {
      out.pairs.push({ id: r.id, nominated: r.nominated, state: r.state, bytesReceived: r.bytesReceived });
    }
  });
  return out;
};

$("join").onclick = join;
$("leave").onclick = leave;
$("mute").onclick = toggleMute;
$("callPhone").onclick = callPhone;
$("hangUpPhone").onclick = hangUpPhone;
$("moveDevice").onclick = requestMoveCode;
$("newCode").onclick = requestMoveCode;
$("closeMove").onclick = closeMovePanel;
if (transferMode) {
  // The session comes from the code: no room or token to type, and nothing to join by hand.
  $("credentials").hidden = true;
  $("join").hidden = true;
  if (transferCode) takeOver(transferCode);
  else setStatus("This link has no transfer code. Scan the code on your other device again.", true);
} else if (params.get("autojoin") === "1") join();

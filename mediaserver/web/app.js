// Chorus web client: joins a room over WebRTC the way WHIP does (one POST with the SDP offer),
// shows who is speaking, and mutes. No framework: this file is the whole client.
"use strict";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
if (params.get("room")) $("room").value = params.get("room");
if (params.get("token")) $("token").value = params.get("token");

let pc = null;
let local = null;
let leaveUrl = null;
let pollTimer = null;
let audioCtx = null;
let remoteAnalyser = null;

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

function authHeaders() {
  return { Authorization: "Bearer " + $("token").value.trim() };
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
  $("join").disabled = true;
  try {
    setStatus("Asking for the microphone…");
    // ?raw=1 turns voice processing off (music, or test tones that noise suppression would eat).
    const raw = params.get("raw") === "1";
    local = await navigator.mediaDevices.getUserMedia({
      audio: { echoCancellation: !raw, noiseSuppression: !raw, autoGainControl: !raw },
    });
    audioCtx = new AudioContext();
    meterFor(local, $("micLevel"));

    pc = new RTCPeerConnection();
    pc.addTransceiver(local.getAudioTracks()[0], { direction: "sendrecv", streams: [local] });
    pc.ontrack = (ev) => {
      const stream = ev.streams[0] || new MediaStream([ev.track]);
      $("remote").srcObject = stream; // Chrome only feeds WebAudio from a stream that also plays
      remoteAnalyser = audioCtx.createAnalyser();
      remoteAnalyser.fftSize = 8192;
      audioCtx.createMediaStreamSource(stream).connect(remoteAnalyser);
    };
    pc.onconnectionstatechange = () => {
      if (pc.connectionState === "connected") setStatus("Connected to room " + room + ".");
      if (pc.connectionState === "failed") setStatus("Connection failed.", true);
    };
    await pc.setLocalDescription(await pc.createOffer());
    setStatus("Connecting…");
    await gatheringComplete(pc);

    const res = await fetch("/v1/rooms/" + encodeURIComponent(room) + "/participants", {
      method: "POST",
      headers: { ...authHeaders(), "Content-Type": "application/sdp" },
      body: pc.localDescription.sdp,
    });
    if (res.status !== 201) {
      const body = await res.json().catch(() => ({ error: res.statusText }));
      throw new Error(body.error || ("HTTP " + res.status));
    }
    leaveUrl = res.headers.get("Location");
    window.chorusParticipantId = res.headers.get("Chorus-Participant-Id");
    await pc.setRemoteDescription({ type: "answer", sdp: await res.text() });
    $("leave").disabled = false;
    $("mute").disabled = false;
    $("callPhone").disabled = false;
    pollTimer = setInterval(() => poll(room), 500);
  } catch (e) {
    setStatus("Could not join: " + e.message, true);
    cleanup();
  }
}

async function leave() {
  if (leaveUrl) {
    await fetch(leaveUrl, { method: "DELETE", headers: authHeaders() }).catch(() => {});
  }
  cleanup();
  setStatus("Left the room.");
}

function cleanup() {
  clearInterval(pollTimer);
  if (pc) pc.close();
  if (local) local.getTracks().forEach((t) => t.stop());
  pc = null; local = null; leaveUrl = null;
  $("join").disabled = false;
  $("leave").disabled = true;
  $("mute").disabled = true;
  $("mute").textContent = "Mute";
  $("callPhone").disabled = true;
  $("hangUpPhone").disabled = true;
  if (phoneEvents) phoneEvents.abort();
}

function toggleMute() {
  const track = local && local.getAudioTracks()[0];
  if (!track) return;
  // A disabled track sends silence, which the server ranks last and does not decode.
  track.enabled = !track.enabled;
  $("mute").textContent = track.enabled ? "Mute" : "Unmute";
}

async function poll(room) {
  const res = await fetch("/v1/rooms/" + encodeURIComponent(room), { headers: authHeaders() }).catch(() => null);
  if (!res || !res.ok) return;
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
async function followPhone(url) {
  phoneEvents = new AbortController();
  try {
    const res = await fetch(url + "/events", { headers: authHeaders(), signal: phoneEvents.signal });
    const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += value;
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const block = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5)).join("");
        if (data) showPhoneState(JSON.parse(data));
      }
    }
  } catch (e) {
    if (e.name !== "AbortError") setStatus("Lost the phone call's events: " + e.message, true);
  }
}

async function callPhone() {
  const to = $("phoneTo").value.trim();
  if (!to) { $("phoneState").textContent = "Enter your phone's number or extension."; return; }
  $("callPhone").disabled = true;
  const room = $("room").value.trim();
  const res = await fetch("/v1/rooms/" + encodeURIComponent(room) + "/calls", {
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

$("join").onclick = join;
$("leave").onclick = leave;
$("mute").onclick = toggleMute;
$("callPhone").onclick = callPhone;
$("hangUpPhone").onclick = hangUpPhone;
if (params.get("autojoin") === "1") join();

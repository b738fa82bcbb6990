// "Move to another device" in Debian's headless Chromium, driven in two steps by the caller:
//
// 1. Page 1 (its own Chromium, fake microphone playing WAV1) opens URL, which joins a room, clicks
//    "Move to another device", waits for the QR code and screenshots it to PNG. It prints one JSON
//    line and waits for a line on stdin:
//      {"step": "qr", "png": "/tmp/qr.png", "participantId": "1", "status": "Connected to room r."}
// 2. The caller scans the PNG (zbarimg) and writes the URL it holds as one line. Page 2 opens it in
//    a fresh context of a second Chromium (no cookies, no storage; fake microphone playing WAV2,
//    since the fake capture file is per browser), which takes the session over. It prints:
//      {"step": "moved", "page2Status": "Connected to room r.", "page2State": "connected",
//       "page2ParticipantId": "1", "page2Location": "http://…/t?raw=1", "page1Status":
//       "Moved to another device.", "page1State": "none", ...}
//    and keeps both pages open (page 2 talking) until stdin has another line or ends, so the
//    caller can listen to the room meanwhile.
//
// Both pages run with ?raw=1 (voice processing off: noise suppression eats steady test tones);
// the scanned URL gets it added in front of its fragment.
// Usage: node move_device.mjs URL WAV1 WAV2 PNG
import { createInterface } from "node:readline";
import { launchWithFakeMic } from "./launch.mjs";

const [url, wav1, wav2, png] = process.argv.slice(2);
if (!url || !wav1 || !wav2 || !png) {
  console.error("usage: node move_device.mjs URL WAV1 WAV2 PNG");
  process.exit(2);
}

const rl = createInterface({ input: process.stdin });
const lines = rl[Symbol.asyncIterator]();
async function readLine() {
  const { value, done } = await lines.next();
  return done ? null : value.trim();
}
const say = (obj) => console.log(JSON.stringify(obj));
const connected = () => window.chorusState && window.chorusState() === "connected";

const [browser1, browser2] = await Promise.all([launchWithFakeMic(wav1), launchWithFakeMic(wav2)]);
try {
  const page1 = await browser1.newPage();
  page1.on("console", (m) => console.error("page 1:", m.text()));
  await page1.goto(url);
  await page1.waitForFunction(connected, null, { timeout: 20000 });
  await page1.click("#moveDevice");
  const qr = page1.locator("#qr svg");
  await qr.waitFor({ state: "visible", timeout: 10000 });
  await page1.locator("#qr").screenshot({ path: png });
  say({
    step: "qr",
    png,
    participantId: await page1.evaluate(() => window.chorusParticipantId),
    status: await page1.textContent("#status"),
    moveState: await page1.textContent("#moveState"),
  });

  const scanned = await readLine();
  if (!scanned) throw new Error("no URL on stdin");
  const target = new URL(scanned);
  target.searchParams.set("raw", "1");
  // A fresh context: nothing of page 1's origin (cookies, storage) reaches page 2.
  const context2 = await browser2.newContext();
  const page2 = await context2.newPage();
  page2.on("console", (m) => console.error("page 2:", m.text()));
  await page2.goto(target.href);
  const page2Location = await page2.evaluate(() => location.href);
  // Connected, and saying so (the status changes in the same event the state does).
  await page2
    .waitForFunction(() => window.chorusState() === "connected" && document.getElementById("status").textContent.startsWith("Connected"), null, { timeout: 20000 })
    .catch(() => {});
  await page1
    .waitForFunction(() => document.getElementById("status").textContent.includes("Moved to another device."), null, { timeout: 10000 })
    .catch(() => {});
  const status = async (page) => ({
    text: await page.textContent("#status"),
    isError: (await page.getAttribute("#status", "class")) === "error",
    state: await page.evaluate(() => window.chorusState()),
  });
  const [s1, s2] = [await status(page1), await status(page2)];
  say({
    step: "moved",
    page2Status: s2.text,
    page2StatusIsError: s2.isError,
    page2State: s2.state,
    page2ParticipantId: await page2.evaluate(() => window.chorusParticipantId),
    page2Location,
    page2Cookies: (await context2.cookies()).length,
    page2CredentialsHidden: await page2.locator("#credentials").isHidden(),
    page1Status: s1.text,
    page1State: s1.state,
    page1QrPanelHidden: await page1.locator("#movePanel").isHidden(),
  });
  await readLine(); // the caller has listened
} finally {
  rl.close();
  process.stdin.destroy();
  await Promise.all([browser1.close(), browser2.close()]);
}

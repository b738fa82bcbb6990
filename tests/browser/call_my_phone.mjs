// Drives the web client's "Call my phone" control in Debian's headless Chromium: joins a room with a
// fake microphone, calls the given number, waits until the phone is in the call, listens, hangs up,
// and prints what happened as JSON:
//   {"states": ["dialing", "ringing", "active", "ended"], "levels": {"440": -30.2},
//    "activeText": "Your phone is in the call.", "endedText": "Phone call ended: hung up."}
// Usage: node call_my_phone.mjs URL WAV NUMBER LISTEN_SECONDS FREQ[,FREQ...]
import { launchWithFakeMic } from "./launch.mjs";

const [url, wav, number, seconds, freqList] = process.argv.slice(2);
if (!url || !wav || !number || !seconds || !freqList) {
  console.error("usage: node call_my_phone.mjs URL WAV NUMBER LISTEN_SECONDS FREQS");
  process.exit(2);
}
const freqs = freqList.split(",").map(Number);

const browser = await launchWithFakeMic(wav);
try {
  const page = await browser.newPage();
  page.on("console", (m) => console.error("page:", m.text()));
  await page.goto(url);
  await page.waitForFunction(() => window.chorusState && window.chorusState() === "connected", null, { timeout: 20000 });
  // Record every state the page shows, as the user would see them change.
  await page.evaluate(() => {
    window.seenPhoneStates = [];
    const el = document.getElementById("phoneState");
    new MutationObserver(() => {
      const s = window.chorusPhoneState;
      if (s && window.seenPhoneStates[window.seenPhoneStates.length - 1] !== s) window.seenPhoneStates.push(s);
    }).observe(el, { childList: true, characterData: true, subtree: true });
  });
  await page.fill("#phoneTo", number);
  await page.click("#callPhone");
  await page.waitForFunction(() => window.chorusPhoneState === "active", null, { timeout: 20000 });
  const activeText = await page.textContent("#phoneState");
  await page.waitForTimeout(Number(seconds) * 1000);
  const samples = [];
  for (let i = 0; i < 10; i++) {
    samples.push(await page.evaluate((f) => window.chorusMeasure(f), freqs));
    await page.waitForTimeout(100);
  }
  const levels = {};
  freqs.forEach((f, i) => {
    const vals = samples.filter((s) => s).map((s) => s[i]);
    levels[f] = vals.length ? vals.reduce((a, b) => a + b, 0) / vals.length : -200;
  });
  await page.click("#hangUpPhone");
  await page.waitForFunction(() => window.chorusPhoneState === "ended", null, { timeout: 10000 });
  const endedText = await page.textContent("#phoneState");
  const states = await page.evaluate(() => window.seenPhoneStates);
  console.log(JSON.stringify({ states, levels, activeText, endedText }));
} finally {
  await browser.close();
}

// Opens the Chorus web client in Debian's headless Chromium with a fake microphone playing a WAV
// file, joins a room, listens, and prints what the page heard as JSON:
//   {"state": "connected", "levels": {"440": -23.1, "880": -95.0}}
// Usage: node join_and_measure.mjs URL WAV LISTEN_SECONDS FREQ[,FREQ...]
import { launchWithFakeMic } from "./launch.mjs";

const [url, wav, seconds, freqList] = process.argv.slice(2);
if (!url || !wav || !seconds || !freqList) {
  console.error("usage: node join_and_measure.mjs URL WAV LISTEN_SECONDS FREQS");
  process.exit(2);
}
const freqs = freqList.split(",").map(Number);

const browser = await launchWithFakeMic(wav);
try {
  const page = await browser.newPage();
  page.on("console", (m) => console.error("page:", m.text()));
  await page.goto(url);
  await page.waitForFunction(() => window.chorusState && window.chorusState() === "connected", null, { timeout: 20000 });
  // Listen, then average several spectra so one frame's noise does not decide.
  await page.waitForTimeout(Number(seconds) * 1000);
  const samples = [];
  for (let i = 0; i < 10; i++) {
    samples.push(await page.evaluate((f) => window.chorusMeasure(f), freqs));
    await page.waitForTimeout(100);
  }
  const levels = {};
  freqs.forEach((f, i) => {
    const vals = samples.filter(Boolean).map((s) => s[i]);
    levels[f] = vals.reduce((a, b) => a + b, 0) / Math.max(1, vals.length);
  });
  const state = await page.evaluate(() => window.chorusState());
  console.log(JSON.stringify({ state, levels }));
} finally {
  await browser.close();
}

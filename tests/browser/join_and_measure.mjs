// Opens the Chorus web client in Debian's headless Chromium, one browser per participant, each
// with a fake microphone playing its own WAV file; joins them all, listens, and prints what each
// page heard as a JSON array (one entry per participant, in argument order):
//   [{"state": "connected", "levels": {"440": -23.1, "880": -95.0}, "series": {...}, ...}, ...]
// Every page is measured in the same window, while all the others are still connected: run as
// separate processes, the first to join also finished first and left while the others were still
// listening, and they heard it fall silent (a flake CI saw).
// Usage: node join_and_measure.mjs LISTEN_SECONDS FREQ[,FREQ...] URL WAV [URL WAV ...]
import { launchWithFakeMic } from "./launch.mjs";

const [seconds, freqList, ...pairs] = process.argv.slice(2);
if (!seconds || !freqList || pairs.length === 0 || pairs.length % 2 !== 0) {
  console.error("usage: node join_and_measure.mjs LISTEN_SECONDS FREQS URL WAV [URL WAV ...]");
  process.exit(2);
}
const freqs = freqList.split(",").map(Number);
const people = [];
for (let i = 0; i < pairs.length; i += 2) people.push({ url: pairs[i], wav: pairs[i + 1] });

const browsers = await Promise.all(people.map((p) => launchWithFakeMic(p.wav)));
try {
  const pages = await Promise.all(
    browsers.map(async (browser, i) => {
      const page = await browser.newPage();
      page.on("console", (m) => console.error(`page ${i}:`, m.text()));
      await page.goto(people[i].url);
      await page.waitForFunction(
        () => window.chorusState && window.chorusState() === "connected",
        null,
        { timeout: 20000 },
      );
      return page;
    }),
  );
  // Everyone is connected from here: listen, then average several spectra per page so one
  // frame's noise does not decide.
  await pages[0].waitForTimeout(Number(seconds) * 1000);
  const samples = pages.map(() => []);
  // The browser's received-packet and concealed-sample counts at each sample.
  const received = pages.map(() => []);
  for (let n = 0; n < 10; n++) {
    for (const [i, page] of pages.entries()) {
      samples[i].push(await page.evaluate((f) => window.chorusMeasure(f), freqs));
      const st = await page.evaluate(() => window.chorusReceiveStats && window.chorusReceiveStats());
      received[i].push(st && st.inbound ? [st.inbound.packetsReceived, st.inbound.concealedSamples] : null);
    }
    await pages[0].waitForTimeout(100);
  }
  const results = [];
  for (const [i, page] of pages.entries()) {
    const levels = {};
    // Every sample too, rounded: a failure then shows a dropout apart from a steady attenuation.
    const series = {};
    freqs.forEach((f, k) => {
      const vals = samples[i].filter(Boolean).map((s) => s[k]);
      levels[f] = vals.reduce((a, b) => a + b, 0) / Math.max(1, vals.length);
      series[f] = samples[i].map((s) => (s ? Math.round(s[k]) : null));
    });
    const state = await page.evaluate(() => window.chorusState());
    const stats = await page.evaluate(() => window.chorusReceiveStats && window.chorusReceiveStats());
    results.push({ state, levels, series, received: received[i], stats });
  }
  console.log(JSON.stringify(results));
} finally {
  await Promise.all(browsers.map((b) => b.close()));
}

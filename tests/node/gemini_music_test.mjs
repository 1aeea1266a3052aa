// @google/genai (Node) realtime music (Lyria) through the sidecar: baseUrl at the
// sidecar, the virtual key as apiKey (the SDK sends it as ?key=). Prompts, play, and the
// sizes of the first two audio chunks.
// Usage: node gemini_music_test.mjs BASE_URL KEY MODEL  -> JSON on stdout
import { GoogleGenAI } from '@google/genai';

const [baseUrl, apiKey, model] = process.argv.slice(2);
const ai = new GoogleGenAI({ apiKey, httpOptions: { baseUrl, apiVersion: 'v1alpha' } });
const result = { chunks: [], close: null };
let session;
const finished = new Promise((resolve) => {
  ai.live.music.connect({
    model,
    callbacks: {
      onmessage: (m) => {
        for (const c of m.serverContent?.audioChunks ?? []) result.chunks.push(Buffer.from(c.data, 'base64').length);
        if (result.chunks.length === 2) session.close();
      },
      onerror: (e) => { result.error = String(e.message ?? e); },
      onclose: (e) => { result.close = [e.code, e.reason]; resolve(); },
    },
  }).then(async (s) => {
    session = s;
    await s.setWeightedPrompts({ weightedPrompts: [{ text: 'piano', weight: 1.0 }] });
    s.play();
  }, (e) => { result.error = String(e.message ?? e); resolve(); });
});
const timer = setTimeout(() => { result.error = 'timeout'; process.stdout.write(JSON.stringify(result)); process.exit(1); }, 20000);
await finished;
clearTimeout(timer);
process.stdout.write(JSON.stringify(result));

// @google/genai (Node) Live API through the sidecar: baseUrl at the sidecar, the
// virtual key as apiKey (the SDK sends it as ?key=). One text turn, then turnComplete.
// Usage: node gemini_live_test.mjs BASE_URL KEY MODEL [API_VERSION]  -> JSON on stdout
import { GoogleGenAI, Modality } from '@google/genai';

const [baseUrl, apiKey, model, apiVersion] = process.argv.slice(2);
const ai = new GoogleGenAI({ apiKey, httpOptions: { baseUrl, ...(apiVersion && { apiVersion }) } });
const result = { texts: [], turnComplete: false, close: null };
let session;
const finished = new Promise((resolve) => {
  ai.live.connect({
    model,
    config: { responseModalities: [Modality.TEXT] },
    callbacks: {
      onmessage: (m) => {
        if (m.text) result.texts.push(m.text);
        if (m.serverContent?.turnComplete) { result.turnComplete = true; session.close(); }
      },
      onerror: (e) => { result.error = String(e.message ?? e); },
      onclose: (e) => { result.close = [e.code, e.reason]; resolve(); },
    },
  }).then((s) => {
    session = s;
    s.sendClientContent({ turns: [{ role: 'user', parts: [{ text: 'hello node' }] }], turnComplete: true });
  }, (e) => { result.error = String(e.message ?? e); resolve(); });
});
const timer = setTimeout(() => { result.error = 'timeout'; process.stdout.write(JSON.stringify(result)); process.exit(1); }, 20000);
await finished;
clearTimeout(timer);
process.stdout.write(JSON.stringify(result));

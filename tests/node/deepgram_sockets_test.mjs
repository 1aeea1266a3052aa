// @deepgram/sdk (Node) Flux and streaming TTS through the sidecar: baseUrl at the
// sidecar, the virtual key as apiKey. Flux: 1 s of 16 kHz PCM16 in 20 ms frames, then
// CloseStream. Speak (v1) and Flux TTS (speak2): one text, Flush, then Close once Flushed.
// Usage: node deepgram_sockets_test.mjs BASE_URL KEY flux|speak|speak2  -> JSON on stdout
import { DeepgramClient } from '@deepgram/sdk';

const [baseUrl, apiKey, which] = process.argv.slice(2);
const client = new DeepgramClient({ apiKey, baseUrl });
const result = { types: [], audioBytes: 0, close: null };
const socket = which === 'flux'
  ? await client.listen.v2.connect({
    model: 'flux-general-en', encoding: 'linear16', sample_rate: 16000, reconnectAttempts: 0,
  })
  : which === 'speak2'
    ? await client.speak.v2.connect({
      model: 'flux-alexis-en', encoding: 'linear16', sample_rate: 24000, reconnectAttempts: 0,
    })
    : await client.speak.v1.connect({
      model: 'aura-2-thalia-en', encoding: 'linear16', sample_rate: 24000, reconnectAttempts: 0,
    });
const closed = new Promise((resolve) => {
  socket.on('message', (m) => {
    if (m instanceof Blob) { // the SDK hands audio over as a Blob (whose `type` is its MIME type)
      result.audioBytes += m.size;
      return;
    }
    result.types.push(m.type);
    if (m.type === 'TurnInfo') result.transcript = m.transcript;
    if (m.type === 'Flushed') socket.sendClose({ type: 'Close' });
  });
  // The first close is the server's; the SDK's wrapper may report its own 1000 later.
  socket.on('close', (e) => { result.close ??= [e.code, e.reason]; resolve(); });
  socket.on('error', (e) => { result.error = String(e.message ?? e); });
});
socket.connect();
try {
  await socket.waitForOpen();
  if (which === 'flux') {
    for (let i = 0; i < 50; i++) socket.sendMedia(new Uint8Array(640));
    socket.sendCloseStream({ type: 'CloseStream' });
  } else if (which === 'speak2') {
    socket.sendSpeak({ type: 'Speak', text: 'Hello node' });
    socket.sendFlush({ type: 'Flush' });
  } else {
    socket.sendText({ type: 'Speak', text: 'Hello node' });
    socket.sendFlush({ type: 'Flush' });
  }
} catch (e) {
  result.error = String(e.message ?? e);
}
const timer = setTimeout(() => { result.error = 'timeout'; process.stdout.write(JSON.stringify(result)); process.exit(1); }, 20000);
await closed;
clearTimeout(timer);
socket.close();
process.stdout.write(JSON.stringify(result));
process.exit(0);

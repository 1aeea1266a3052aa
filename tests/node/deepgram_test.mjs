// @deepgram/sdk (Node) live transcription through the sidecar: baseUrl at the sidecar,
// the virtual key as apiKey. 1 s of 16 kHz PCM16 in 20 ms frames, then CloseStream.
// Usage: node deepgram_test.mjs BASE_URL KEY  -> JSON on stdout
import { DeepgramClient } from '@deepgram/sdk';

const [baseUrl, apiKey] = process.argv.slice(2);
const client = new DeepgramClient({ apiKey, baseUrl });
const result = { types: [], transcripts: [], close: null };
const socket = await client.listen.v1.connect({
  model: 'nova-3', encoding: 'linear16', sample_rate: 16000, reconnectAttempts: 0,
});
const closed = new Promise((resolve) => {
  socket.on('message', (m) => {
    result.types.push(m.type);
    if (m.type === 'Results') result.transcripts.push(m.channel.alternatives[0].transcript);
    if (m.type === 'Metadata') result.duration = m.duration;
  });
  // The first close is the server's; the SDK's wrapper may report its own 1000 later.
  socket.on('close', (e) => { result.close ??= [e.code, e.reason]; resolve(); });
  socket.on('error', (e) => { result.error = String(e.message ?? e); });
});
socket.connect();
try {
  await socket.waitForOpen();
  for (let i = 0; i < 50; i++) socket.sendMedia(new Uint8Array(640));
  socket.sendCloseStream({ type: 'CloseStream' });
} catch (e) {
  result.error = String(e.message ?? e);
}
const timer = setTimeout(() => { result.error = 'timeout'; process.stdout.write(JSON.stringify(result)); process.exit(1); }, 20000);
await closed;
clearTimeout(timer);
socket.close();
process.stdout.write(JSON.stringify(result));
process.exit(0);
